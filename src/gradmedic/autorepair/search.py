"""The repair search: diagnose, try ranked remedies on fresh copies, retrain, verify.

The ranked search:

1. fuses the ranked remedy lists of all findings into one order
   (reciprocal-rank fusion weighted by severity: a remedy that several findings
   propose rises);
2. tries one remedy of each kind (group) before a second variant of any, and
   triages with a preflight (like :func:`gradmedic.check`: one forward and
   backward pass at initialization): if the original is already sick at initialization
   the cause is structural and model remedies (init, surgery) go first, else
   training-loop remedies (learning rate, clipping, optimizer) go first;
3. screens each candidate by its own preflight and trains only those healthy at
   initialization (a screened-out candidate costs one pass, not a run);
4. tries each remedy alone, then extends the most promising candidates (fewest,
   least severe findings, best metric) by the cures of *their* remaining
   findings: "one was not enough, add the cure for what is left".

The random search draws compatible combinations of 1-3 remedies uniformly from
the whole catalog and trains each (Kim et al., ICST 2023, showed such a search
matches AUTOTRAINER; ``benchmarks/repair.py`` compares the two).

Acceptance rule, the same for both: the candidate's diagnosis is healthy, it
trains (its training loss falls by at least 10%), and its metric is no worse than
the original's and than every candidate trained before it. The search stops at
the first accepted candidate.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from gradmedic.autorepair.appliers import applier_for, compatible, order, whole_catalog
from gradmedic.autorepair.result import Candidate, RepairResult, describe, format_metric
from gradmedic.autorepair.setup import Budget, Metric, OptimizerFactory, Setup
from gradmedic.autorepair.snippet import snippet
from gradmedic.autorepair.train import build, first_batch, preflight, train
from gradmedic.errors import GradmedicError
from gradmedic.findings import Finding, Remedy

MAX_COMBINATION = 3
# "A model that trains": the training loss over the last tenth of the steps must be
# at most this fraction of the first tenth's (a learning rate of 1e-8 removes every
# finding and every bit of learning).
TRAINS = 0.9
STRATEGIES = ("ranked", "random")


@dataclass(frozen=True)
class Progress:
    """Reported to the ``progress`` callback before and after each candidate.

    Attributes:
        index: Candidate index (0: the original).
        remedies: Its remedies.
        max_candidates: The search's limit.
        done: The finished candidate (None when it is about to start).
    """

    index: int
    remedies: tuple[Remedy, ...]
    max_candidates: int
    done: Candidate | None = None


ProgressFn = Callable[[Progress], None]
# A search plan yields combinations of remedies and is sent back each one's Candidate.
Plan = Generator[tuple[Remedy, ...], Candidate, None]


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
    """Find remedies under which the setup trains without gradient findings.

    Trains the original setup briefly under :func:`gradmedic.watch` and diagnoses it;
    if something is found, trains candidates (each a fresh model from ``factory``
    with one or more remedies, the same budget and seed), re-diagnoses each, and
    accepts the first whose diagnosis is healthy, that trains (training loss down by
    10% or more), and whose metric is no worse than the original's and every earlier
    trained candidate's. The user's model is never touched.

    Args:
        factory: ``() -> nn.Module`` returning a fresh model, a model to copy, or a
            complete :class:`Setup` (then ``data`` and ``loss_fn`` are omitted).
        data: ``(train, val)``; see :class:`Setup`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        metric: ``None`` (validation loss), ``"accuracy"``, a :class:`Metric` or
            ``fn(outputs, targets) -> float`` (higher is better).
        optimizer: Optimizer factory ``(params) -> Optimizer``; default SGD lr 0.01.
        batch_size: Batch size for tensor data.
        budget: Steps and seconds per candidate (default 200 steps, 60 s).
        seed: Seed for every run (two calls give the same table).
        max_candidates: Candidates to train at most, besides the original.
        strategy: ``"ranked"`` (the diagnosis' remedies, best-first) or ``"random"``
            (uniformly random remedies from the catalog; a baseline).
        progress: Called with a :class:`Progress` before and after each candidate.

    Returns:
        A :class:`RepairResult`: the table of candidates, the verdict, the repaired
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
    """The state of one search: the candidates so far and the acceptance reference."""

    def __init__(
        self,
        setup: Setup,
        budget: Budget,
        seed: int,
        max_candidates: int,
        strategy: str,
        progress: ProgressFn | None,
    ) -> None:
        self.setup = setup
        self.budget = budget
        self.seed = seed
        self.max_candidates = max_candidates
        self.strategy = strategy
        self.progress = progress
        self.metric = setup.resolved_metric
        self.candidates: list[Candidate] = []
        self.models: dict[int, nn.Module] = {}
        self.start = time.perf_counter()

    # ---- bookkeeping ------------------------------------------------------------

    def _time_left(self) -> bool:
        total = self.budget.total_seconds
        return total is None or time.perf_counter() - self.start < total

    def _trained(self) -> int:
        return sum(1 for c in self.candidates[1:] if c.trained)

    def _best_score(self) -> float:
        return max(self.metric.score(c.metric) for c in self.candidates if c.trained)

    def _try(self, remedies: Sequence[Remedy]) -> Candidate:
        remedies = tuple(order(remedies))
        index = len(self.candidates)
        if self.progress:
            self.progress(Progress(index, remedies, self.max_candidates))
        if index == 0:
            candidate = self._train(index, remedies)
        else:
            try:
                candidate = self._screen(index, remedies) or self._train(index, remedies)
            except Exception as exc:  # a remedy that does not fit this model
                nan = float("nan")
                note = f"not applicable: {type(exc).__name__}: {exc}"[:200]
                candidate = Candidate(index, remedies, None, nan, nan, 0, 0.0, note=note)
            if candidate.trained:
                self._judge(candidate)
        self.candidates.append(candidate)
        if self.progress:
            self.progress(Progress(index, remedies, self.max_candidates, candidate))
        return candidate

    def _screen(self, index: int, remedies: tuple[Remedy, ...]) -> Candidate | None:
        """The candidate, untrained, when its preflight already has findings (ranked only)."""
        if self.strategy != "ranked":
            return None
        start = time.perf_counter()
        pre = preflight(self.setup, remedies, seed=self.seed)
        if pre.healthy:
            return None
        nan = float("nan")
        seconds = time.perf_counter() - start
        note = "screened out: findings at initialization"
        return Candidate(index, remedies, pre, nan, nan, 0, seconds, note=note, screened=True)

    def _train(self, index: int, remedies: tuple[Remedy, ...]) -> Candidate:
        out = train(self.setup, remedies, budget=self.budget, seed=self.seed)
        # keep the original's model and the latest (the accepted one is the latest)
        self.models = {i: m for i, m in self.models.items() if i == 0}
        self.models[index] = out.model
        if out.diverged:
            note = f"diverged at step {out.steps}"
        elif out.steps < self.budget.steps:
            note = f"cut by the time cap at step {out.steps}/{self.budget.steps}"
        else:
            note = ""
        return Candidate(
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
        )

    def _judge(self, candidate: Candidate) -> None:
        reference = self._best_score()
        if not candidate.healthy:
            candidate.note = candidate.note or "findings remain"
        elif not candidate.progress <= TRAINS:
            candidate.note = (
                f"does not train: the training loss ends at {candidate.progress:.3g}x its start"
            )
        elif not math.isfinite(candidate.metric):
            candidate.note = f"{self.metric.name} is {candidate.metric}"
        elif self.metric.score(candidate.metric) < reference:
            best = max((c for c in self.candidates if c.trained), key=self._score)
            candidate.note = (
                f"{self.metric.name} {format_metric(candidate.metric)} worse than "
                f"{best.label}'s {format_metric(best.metric)}"
            )
        else:
            candidate.accepted = True
            candidate.note = "accepted"

    def _score(self, candidate: Candidate) -> float:
        return self.metric.score(candidate.metric)

    # ---- the search -------------------------------------------------------------

    def run(self) -> RepairResult:
        original = self._try(())
        if original.healthy:
            original.note = "no findings"
            return self._result("healthy", "no repair needed")
        plan = (self._ranked if self.strategy == "ranked" else self._random)(original)
        candidate = None
        attempts = 0  # screened and inapplicable candidates are cheap, but not free
        while self._trained() < self.max_candidates and self._time_left():
            attempts += 1
            if attempts > 5 * self.max_candidates + 20:
                break
            try:  # the plan is told how each of its candidates fared
                remedies = plan.send(candidate) if candidate is not None else next(plan)
            except StopIteration:
                break
            candidate = self._try(remedies)
            if candidate.accepted:
                break
        accepted = next((c for c in self.candidates if c.accepted), None)
        if accepted is not None:
            before = format_metric(original.metric)
            after = format_metric(accepted.metric)
            return self._result(
                "repaired",
                f"repaired by {describe(accepted.remedies)} "
                f"({self.metric.name} {before} -> {after}) after {self._trained()} candidate(s)",
            )
        why = "within the time budget" if not self._time_left() else "among the candidates tried"
        return self._result(
            "unrepaired", f"no candidate was healthy and no worse than the original {why}"
        )

    def _ranked(self, original: Candidate) -> Plan:
        """Each fused remedy alone, then combinations, most promising parent first.

        Triage: when the original's preflight (at initialization) already shows
        findings, the cause is structural and model remedies go first; when it is
        healthy, the problem arose in training and training-loop remedies go first.
        """
        structural = not preflight(self.setup, seed=self.seed).healthy
        fused = _fused(_findings(original))
        variant = _variant_ranks(fused)
        # kind first (triage), then one remedy of each group before a second variant
        # of any (clip_norm at three thresholds would otherwise come in a row)
        root = sorted(
            fused,
            key=lambda r: ((applier_for(r).model is None) == structural, variant[_key(r)]),
        )
        seen: set[frozenset[str]] = set()
        heap: list[tuple[Any, ...]] = []
        tie = itertools.count()

        def extend(parent: Candidate, combo: tuple[Remedy, ...]) -> None:
            # "One is not enough": add the cures of what remains, then the original's.
            if parent.diagnosis is None or len(combo) >= MAX_COMBINATION:
                return
            present = {_key(r) for r in combo}
            for i, remedy in enumerate(_unique(_fused(_findings(parent)) + root)):
                child = (*combo, remedy)
                if _key(remedy) in present or not compatible(child):
                    continue
                priority = (_weight(parent), -self._score(parent), i, next(tie))
                heapq.heappush(heap, (*priority, child))

        singles = []
        for remedy in root:
            seen.add(_combo_key((remedy,)))
            singles.append(((remedy,), (yield (remedy,))))
        for combo, candidate in singles:
            extend(candidate, combo)
        while heap:
            child = heapq.heappop(heap)[-1]
            if _combo_key(child) in seen:
                continue
            seen.add(_combo_key(child))
            extend((yield child), child)

    def _random(self, original: Candidate) -> Plan:
        """Uniformly random compatible combinations of 1..3 catalog remedies."""
        rng = random.Random(self.seed)
        batch = first_batch(self.setup, self.seed)[0]
        pool = whole_catalog(build(self.setup, (), batch, self.seed))
        seen: set[frozenset[str]] = set()
        for _ in range(100 * max(self.max_candidates, 1)):
            size = rng.randint(1, min(MAX_COMBINATION, len(pool)))
            combo = tuple(rng.sample(pool, size))
            key = _combo_key(combo)
            if key in seen or not compatible(combo):
                continue
            seen.add(key)
            yield combo

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
        )


def _findings(candidate: Candidate) -> list[Finding]:
    return list(candidate.diagnosis.findings) if candidate.diagnosis is not None else []


def _weight(candidate: Candidate) -> int:
    """Severity-weighted count of findings (info 1, warning 2, critical 3)."""
    return sum(1 + f.severity.rank for f in _findings(candidate))


def _key(remedy: Remedy) -> str:
    return remedy.name + json.dumps(dict(remedy.params), sort_keys=True, default=str)


def _combo_key(combo: Sequence[Remedy]) -> frozenset[str]:
    return frozenset(map(_key, combo))


def _unique(remedies: Sequence[Remedy]) -> list[Remedy]:
    seen: dict[str, Remedy] = {}
    for r in remedies:
        seen.setdefault(_key(r), r)
    return list(seen.values())


def _variant_ranks(remedies: Sequence[Remedy]) -> dict[str, int]:
    """For each remedy, how many of its group (e.g. other clip thresholds) come before it."""
    count: dict[str, int] = {}
    ranks = {}
    for remedy in remedies:
        group = applier_for(remedy).group
        ranks[_key(remedy)] = count.get(group, 0)
        count[group] = count.get(group, 0) + 1
    return ranks


def _fused(findings: Sequence[Finding]) -> list[Remedy]:
    """All findings' remedies in one order: score = sum of severity weight / (rank + 1)."""
    score: dict[str, float] = {}
    first: dict[str, Remedy] = {}
    for finding in findings:
        weight = 1 + finding.severity.rank
        for rank, remedy in enumerate(finding.remedies):
            try:
                applier_for(remedy)
            except GradmedicError:
                continue  # a remedy the search cannot apply (reported nowhere else)
            key = _key(remedy)
            score[key] = score.get(key, 0.0) + weight / (rank + 1)
            first.setdefault(key, remedy)
    keys = sorted(first, key=lambda k: -score[k])  # stable: ties keep first appearance
    return [first[k] for k in keys]
