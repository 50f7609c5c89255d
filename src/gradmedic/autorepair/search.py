"""The repair search: diagnose, try remedies on fresh copies, keep the best cure.

Compute is counted in training steps: the search may train ``max_candidates x
budget.steps`` steps besides the original's run; both strategies spend the same.
The ranked search's screening preflights (one forward and backward pass each,
no optimizer step) are counted apart, in ``RepairResult.extra["preflights"]``.

**Ranked** (successive halving, one short rung, over
:func:`gradmedic.autorepair.plan.ranked_pool`):

1. rung 0: the most promising combinations, each screened by its preflight
   (:func:`gradmedic.check` at initialization: a candidate sick before its first
   step is not trained), are trained for ``steps / 9`` steps (a warmup
   compressed by the same factor, so that a short run sees the full run's
   schedule); the two best that still have findings are extended by the
   cure of what remains ("one was not enough") and join the rung;
2. the best of them (healthy first, then no critical finding, then the lowest
   validation loss) train for the full ``budget.steps``: one for a budget of 2
   runs, two for 3-5, half the budget from 6 on (see ``_Search._plan``);
3. budget left over trains the next best at full length.

**Random** trains uniformly random compatible combinations of 1-3 catalog
remedies at full length until the same number of steps is spent.

**Acceptance**, the same for both, among full-length runs only: healthy (no
findings) and a validation metric clearly better than a trivial predictor the
search computes (:mod:`gradmedic.autorepair.reference`). The accepted fix is the
best such run, not the first; when none passes, the message names the runs
that came closest and why each failed.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmedic.autorepair.appliers import NotApplicable, compatible, order, whole_catalog
from gradmedic.autorepair.plan import (
    MAX_COMBINATION,
    combo_key,
    extension,
    fused,
    ranked_pool,
    whole_catalog_extra,
)
from gradmedic.autorepair.problem import Budget, Metric, OptimizerFactory, Setup, val_batches
from gradmedic.autorepair.reference import Reference, reference
from gradmedic.autorepair.result import Candidate, RepairResult, describe, format_metric
from gradmedic.autorepair.snippet import snippet
from gradmedic.autorepair.train import TrainOutcome, build, first_batch, preflight, train
from gradmedic.findings import Finding, Remedy
from gradmedic.optimizer_facts import ADAPTIVE

SHORT = 9  # a short run is budget.steps / 9 steps: nine cost one full run
CHILDREN = 2  # rung-0 candidates extended by the cure of their remaining findings
STRATEGIES = ("ranked", "random")


@dataclass(frozen=True)
class Progress:
    """Reported to the ``progress`` callback before and after each training run.

    Attributes:
        index: Candidate index (0: the original).
        remedies: Its remedies.
        max_candidates: The search's compute, in full training runs.
        done: The finished candidate (None when it is about to start).
        spent: Training steps spent so far (the original's excluded).
        total: Training steps the search may spend.
    """

    index: int
    remedies: tuple[Remedy, ...]
    max_candidates: int
    done: Candidate | None = None
    spent: int = 0
    total: int = 0


ProgressFn = Callable[[Progress], None]


def repair(
    factory: Callable[[], nn.Module] | nn.Module | Setup,
    data: tuple[Any, Any] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    *,
    metric: Metric | str | Callable[..., float] | None = None,
    optimizer: OptimizerFactory | None = None,
    batch_size: int = 64,
    budget: Budget | None = None,
    seed: int = 0,
    max_candidates: int = 12,
    strategy: str = "ranked",
    progress: ProgressFn | None = None,
) -> RepairResult:
    """Find the best remedies under which the setup trains healthily and learns.

    Trains the original setup briefly under :func:`gradmedic.watch` and diagnoses it;
    if something is found, trains candidates (each a fresh model from ``factory``
    with one or more remedies, the same seed) by successive halving, and accepts the
    best full-length run that is healthy and clearly beats a trivial predictor
    (the majority class, the targets' mean). The user's model is never touched.

    Args:
        factory: ``() -> nn.Module`` returning a fresh model, a model to copy, or a
            complete :class:`Setup` (then ``data`` and ``loss_fn`` are omitted).
        data: ``(train, val)``; see :class:`Setup`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        metric: ``None`` (validation loss), ``"accuracy"``, a :class:`Metric` or
            ``fn(outputs, targets) -> float`` (higher is better).
        optimizer: Optimizer factory ``(params) -> Optimizer``; default SGD lr 0.01.
        batch_size: Batch size for tensor data.
        budget: Steps and seconds of a full run (default 200 steps, 60 s).
        seed: Seed for every run (two calls give the same table).
        max_candidates: The search's compute in full runs: it trains at most
            ``max_candidates * budget.steps`` steps besides the original's run
            (short runs count their steps).
        strategy: ``"ranked"`` (the diagnosis' remedies, successive halving) or
            ``"random"`` (random catalog remedies at full length; a baseline).
        progress: Called with a :class:`Progress` before and after each run.

    Returns:
        A :class:`RepairResult`: the table of runs, the verdict, the repaired
        model and the changes as code.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x = torch.randn(128, 4); y = x.sum(1, keepdim=True)
        >>> result = repair(lambda: nn.Linear(4, 1), ((x, y), (x, y)), nn.MSELoss(),
        ...                 budget=Budget(steps=20))
        >>> result.status
        'healthy'
    """
    if isinstance(factory, Setup):
        setup = factory
    else:
        if data is None or loss_fn is None:
            raise TypeError("repair() needs data and loss_fn unless factory is a Setup")
        setup = Setup(factory, data, loss_fn, optimizer, metric, batch_size)
    budget = budget or Budget()
    if not isinstance(budget, Budget):
        raise TypeError(
            f"budget must be a gradmedic.autorepair.Budget, not {type(budget).__name__}"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(max_candidates, int) or max_candidates < 0:
        raise ValueError(f"max_candidates must be an int >= 0, got {max_candidates!r}")
    return _Search(setup, budget, seed, max_candidates, strategy, progress).run()


class _Search:
    """The state of one search: its runs, the compute spent and the acceptance bar."""

    def __init__(
        self,
        setup: Setup,
        budget: Budget,
        seed: int,
        max_candidates: int,
        strategy: str,
        progress: ProgressFn | None,
        original: TrainOutcome | None = None,
    ) -> None:
        self.cached = original  # the original's run, when the caller already has it
        self.setup = setup
        self.budget = budget
        self.seed = seed
        self.max_candidates = max_candidates
        self.strategy = strategy
        self.progress = progress
        self.metric = setup.resolved_metric
        self.total = max_candidates * budget.steps
        self.spent = 0
        self.preflights = 0  # screening passes: one forward and backward each, no step
        self.candidates: list[Candidate] = []
        self.models: dict[int, nn.Module] = {}
        self.tried: set[frozenset[str]] = set()
        self.reference: Reference | None = None
        self.start = time.perf_counter()

    # ---- bookkeeping ------------------------------------------------------------

    def _time_left(self) -> bool:
        total = self.budget.total_seconds
        return total is None or time.perf_counter() - self.start < total

    def _affords(self, steps: int, reserve: int = 0) -> bool:
        return self.total - self.spent - reserve >= steps and self._time_left()

    def _score(self, candidate: Candidate) -> float:
        return self.metric.score(candidate.metric)

    def _rank(self, candidate: Candidate) -> tuple[int, float, int]:
        """Healthy first, then no critical finding, then the validation loss; earlier on ties.

        Short runs are compared by their validation loss, a finer signal than an
        accuracy after a dozen steps; full-length runs are accepted by the metric.
        """
        tier = 2 if candidate.healthy else int(not _critical(candidate))
        loss = candidate.val_loss
        return (tier, -loss if math.isfinite(loss) else -math.inf, -candidate.index)

    def _event(self, index: int, remedies: tuple[Remedy, ...], done: Candidate | None) -> None:
        if self.progress:
            self.progress(
                Progress(index, remedies, self.max_candidates, done, self.spent, self.total)
            )

    def _run(self, remedies: Sequence[Remedy], steps: int, rung: int | None) -> Candidate:
        """Train one run of ``steps`` steps (the original when ``rung`` is None)."""
        remedies = tuple(order(remedies))
        index = len(self.candidates)
        self._event(index, remedies, None)
        self.tried.add(combo_key(remedies))
        run_budget = Budget(steps=steps, seconds=self.budget.seconds)
        try:
            if rung is None and self.cached is not None:
                out = self.cached
            else:
                out = train(
                    self.setup,
                    remedies,
                    budget=run_budget,
                    seed=self.seed,
                    horizon=self.budget.steps,
                )
        except NotApplicable as exc:
            candidate = _inapplicable(index, remedies, exc)
        else:
            if rung is not None:
                self.spent += out.steps
            note = f"diverged at step {out.steps}" if out.diverged else ""
            if not out.diverged and out.steps < steps:
                note = f"cut by the time cap at step {out.steps}/{steps}"
            candidate = Candidate(
                index,
                remedies,
                out.diagnosis,
                out.metric,
                out.val_loss,
                out.steps,
                out.seconds,
                out.diverged,
                note=note,
                progress=out.progress,
                rung=rung,
            )
            if rung is None or steps == self.budget.steps:
                self.models[index] = out.model
        self.candidates.append(candidate)
        self._event(index, remedies, candidate)
        return candidate

    def _screen(self, remedies: Sequence[Remedy]) -> bool:
        """Whether the combination is healthy at initialization (one step of compute)."""
        remedies = tuple(order(remedies))
        self.tried.add(combo_key(remedies))
        start = time.perf_counter()
        self.preflights += 1
        try:
            pre = preflight(self.setup, remedies, seed=self.seed)
        except NotApplicable as exc:
            self.candidates.append(_inapplicable(len(self.candidates), remedies, exc))
            return False
        if pre.healthy:
            return True
        nan = float("nan")
        seconds = time.perf_counter() - start
        note = "screened out: findings at initialization"
        self.candidates.append(
            Candidate(
                len(self.candidates),
                remedies,
                pre,
                nan,
                nan,
                0,
                seconds,
                note=note,
                screened=True,
                stage="screened",
            )
        )
        return False

    # ---- the search -------------------------------------------------------------

    def run(self) -> RepairResult:
        original = self._run((), self.budget.steps, None)
        original.stage = "original"
        if original.healthy:
            original.note = "no findings"
            return self._result("healthy", "no repair needed")
        self.reference = self._reference()
        if self.strategy == "ranked":
            self._ranked(original)
        else:
            self._random()
        return self._verdict(original)

    def _reference(self) -> Reference | None:
        x = next(val_batches(self.setup.data[1], self.setup.batch_size))[0]
        model = build(self.setup, (), first_batch(self.setup, self.seed)[0], self.seed)
        model.eval()
        with torch.no_grad():
            outputs = model(x)
        return reference(self.setup, outputs)

    def _plan(self) -> list[tuple[int, int]]:
        """``(steps, runs)`` per rung, the last at full length.

        A budget of 1 run: one full run. Otherwise runs of ``steps / 9`` steps and
        the best of them at full length: 1 full run for a budget of 2, 2 for 3 to
        5 (the best of two full runs is kept), half the budget from 6 on; the
        rest of the compute buys 9 short runs per full run. Breadth first: on the
        repair suite the first of 9 short runs, ranked after ``steps / 9`` steps,
        reached the bar at full length as often as the better of the first two
        (17 of 18 searches; docs/repair.md), so compute goes to trying more.
        The remainder trains the next best at full length.
        """
        steps, mc = self.budget.steps, self.max_candidates
        if mc < 2:
            return [(steps, 1)]
        full = 1 if mc == 2 else max(2, mc // 2)
        return [(max(1, steps // SHORT), SHORT * (mc - full)), (steps, full)]

    def _ranked(self, original: Candidate) -> None:
        at_init = preflight(self.setup, seed=self.seed)
        structural = not at_init.healthy
        findings = _findings(original) + list(at_init.findings)
        batch = first_batch(self.setup, self.seed)[0]
        kinds = {type(m).__name__ for m in build(self.setup, (), batch, self.seed).modules()}
        pool = ranked_pool(findings, structural, self._adaptive(), kinds, self.budget.steps)
        rungs = self._plan()
        planned = sum(s * n for s, n in rungs)
        extra = max(0, self.total - planned) // self.budget.steps * self.budget.steps
        reserve = [sum(s * n for s, n in rungs[r + 1 :]) + extra for r in range(len(rungs))]
        length, count = rungs[0]
        extend = CHILDREN if len(rungs) > 1 else 0
        current = self._fill(pool, max(1, count - extend), length, reserve[0], 0)
        for parent in sorted(current, key=self._rank, reverse=True):
            if extend == 0 or parent.healthy:
                continue
            child = extension(parent.remedies, _findings(parent), self.tried, self.budget.steps)
            if child is not None and self._affords(length, reserve[0]):
                extend -= 1
                if self._screen(child) and (run := self._run(child, length, 0)).trained:
                    current.append(run)
        current += self._fill(pool, count - len(current), length, reserve[0], 0)
        for r, (length, count) in enumerate(rungs[1:], start=1):
            ranked = sorted(current, key=self._rank, reverse=True)
            keep = [c for c in ranked if self._affords(length, reserve[r])][:count]
            for c in ranked:
                if c not in keep:
                    c.stage = "halved"
                    c.note = _join(c.note, f"halved: ranked {ranked.index(c) + 1}/{len(ranked)}")
            for c in keep:
                c.stage = "promoted"
            current = [run for c in keep if (run := self._run(c.remedies, length, r)).trained]
        # compute left over: the next best of the rung below, then the pool, at full length
        full = self.budget.steps
        below = sorted(
            (c for c in self.candidates if c.stage == "halved" and c.trained),
            key=lambda c: (c.steps, *self._rank(c)),
            reverse=True,
        )
        for c in below:
            if not self._affords(full):
                break
            c.stage = "promoted"
            self._run(c.remedies, full, len(rungs) - 1)
        if len(rungs) > 1:
            self._fill(pool, self.max_candidates, full, 0, len(rungs) - 1)

    def _fill(
        self, pool: Iterator[tuple[Remedy, ...]], count: int, steps: int, reserve: int, rung: int
    ) -> list[Candidate]:
        """Up to ``count`` screened, trained runs of ``steps`` steps from ``pool``."""
        runs: list[Candidate] = []
        while len(runs) < count and self._affords(steps, reserve):
            combo = next(pool, None)
            if combo is None:
                break
            if combo_key(combo) in self.tried:
                continue
            if self._screen(combo):
                run = self._run(combo, steps, rung)
                if run.trained:
                    runs.append(run)
        return runs

    def _random(self) -> None:
        rng = random.Random(self.seed)
        batch = first_batch(self.setup, self.seed)[0]
        model = build(self.setup, (), batch, self.seed)
        pool = whole_catalog(model) + whole_catalog_extra(self.budget.steps)
        full = self.budget.steps
        for _ in range(100 * max(self.max_candidates, 1)):
            if not self._affords(full):
                break
            size = rng.randint(1, min(MAX_COMBINATION, len(pool)))
            combo = tuple(order(rng.sample(pool, size)))
            if combo_key(combo) in self.tried or not compatible(combo):
                continue
            self._run(combo, full, 0)

    def _adaptive(self) -> bool:
        probe = nn.Linear(1, 1)
        return type(self.setup.make_optimizer(probe.parameters())).__name__ in ADAPTIVE

    # ---- acceptance -------------------------------------------------------------

    def _verdict(self, original: Candidate) -> RepairResult:
        full = [
            c for c in self.candidates[1:]
            if c.trained and c.steps == self.budget.steps and c.rung is not None
        ]  # fmt: skip
        passed = [c for c in full if self._judge(c, original)]
        compute = f"{self.spent} of {self.total} training steps"
        if passed:
            best = max(passed, key=lambda c: (self._score(c), -c.index))
            best.accepted, best.stage = True, "accepted"
            best.note = _join("accepted", best.note)
            for c in passed:
                if c is not best:
                    c.note = _join(c.note, f"{best.label} is better")
            return self._result(
                "repaired",
                f"repaired by {describe(best.remedies)} ({self.metric.name} "
                f"{format_metric(original.metric)} -> {format_metric(best.metric)}"
                f"{self._margin_text(best)}) after {compute}",
            )
        tried = [c for c in self.candidates[1:] if c.trained]
        closest = sorted(tried, key=lambda c: (c.steps, *self._rank(c)), reverse=True)[:3]
        why = "within the time budget" if not self._time_left() else f"within {compute}"
        bar = self._bar_text()
        text = f"no candidate was healthy and {bar} {why}"
        if closest:
            text += "; closest: " + "; ".join(
                f"{describe(c.remedies)} ({self.metric.name} {format_metric(c.metric)} after "
                f"{c.steps} steps: {c.note or 'findings remain'})"
                for c in closest
            )
        return self._result("unrepaired", text)

    def _judge(self, c: Candidate, original: Candidate) -> bool:
        """Whether a full-length run passes; its note says why or why not."""
        c.stage = "rejected"
        if c.diverged:
            return False
        if not c.healthy:
            c.note = _join(c.note, "findings remain: " + ", ".join(c.findings))
            return False
        ref = self.reference
        if ref is None:  # no trivial predictor fits: the original is the bar
            if not math.isfinite(c.metric) or self._score(c) <= self._score(original):
                c.note = _join(c.note, f"{self.metric.name} not better than the original's")
                return False
            c.stage, c.note = "passed", _join(c.note, "better than the original")
            return True
        if not ref.passes(self.metric, c.metric):
            sign = ">=" if self.metric.higher_is_better else "<="
            c.note = _join(
                c.note,
                f"{self.metric.name} {format_metric(c.metric)} not clearly better than "
                f"{ref.name}'s {format_metric(ref.value)} "
                f"(needs {sign} {format_metric(ref.needed)})",
            )
            return False
        c.stage = "passed"
        c.note = _join(c.note, self._margin_text(c).lstrip(", "))
        return True

    def _margin_text(self, c: Candidate) -> str:
        ref = self.reference
        if ref is None:
            return ""
        margin = ref.margin(self.metric, c.metric)
        return f", {margin:+.3g} over {ref.name}'s {format_metric(ref.value)}"

    def _bar_text(self) -> str:
        ref = self.reference
        if ref is None:
            return "better than the original"
        return f"clearly better than {ref.name} ({self.metric.name} {format_metric(ref.value)})"

    def _result(self, status: str, message: str) -> RepairResult:
        accepted = next((c for c in self.candidates if c.accepted), None)
        chosen = accepted or self.candidates[0]
        if accepted is None and isinstance(self.setup.model_factory, nn.Module):
            model = self.setup.model_factory  # unchanged: the user's own object
        else:
            batch = first_batch(self.setup, self.seed)[0]
            model = build(self.setup, chosen.remedies, batch, self.seed)
        return RepairResult(
            status=status,
            message=message,
            candidates=self.candidates,
            accepted=accepted,
            model=model,
            trained=self.models[chosen.index],
            setup=self.setup,
            snippet=snippet(chosen.remedies) if accepted else snippet(()),
            metric=self.metric,
            budget=self.budget,
            seed=self.seed,
            strategy=self.strategy,
            seconds=time.perf_counter() - self.start,
            reference=self.reference,
            steps_spent=self.spent,
            steps_total=self.total,
            extra={"preflights": self.preflights},
        )


def _inapplicable(index: int, remedies: tuple[Remedy, ...], exc: Exception) -> Candidate:
    nan = float("nan")
    note = f"not applicable: {exc}"[:200]
    return Candidate(index, remedies, None, nan, nan, 0, 0.0, note=note, stage="not applicable")


def _findings(candidate: Candidate) -> list[Finding]:
    return list(candidate.diagnosis.findings) if candidate.diagnosis is not None else []


def _critical(candidate: Candidate) -> bool:
    return any(f.severity.rank >= 2 for f in _findings(candidate))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


_fused = fused  # the name the tests of the fused ranking import
