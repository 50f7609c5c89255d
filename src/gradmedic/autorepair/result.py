"""What a repair search produced: one row per candidate, the verdict, the changes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradmedic.autorepair.problem import Budget, Metric, Setup
from gradmedic.autorepair.reference import Reference
from gradmedic.findings import Diagnosis, Remedy, _plain


@dataclass
class Candidate:
    """One trained candidate (index 0 is the user's original setup).

    Attributes:
        index: Position in the search (0: the original).
        remedies: The remedies applied, in application order.
        diagnosis: The monitor's diagnosis after its training run (None if it failed).
        metric: The setup's metric on validation data.
        val_loss: The validation loss.
        steps: Optimizer steps trained.
        seconds: Wall time of its run.
        diverged: The training loss became non-finite.
        accepted: Whether it is the repair.
        note: Why it was accepted or rejected.
        progress: Training loss at the end over at the start (see
            :attr:`gradmedic.autorepair.TrainOutcome.progress`).
        screened: Not trained: the preflight (:func:`gradmedic.check` at
            initialization) already had findings; ``diagnosis`` is the preflight's.
        rung: The successive-halving rung of the run (None: the original).
        stage: Why it stopped: ``"original"``, ``"screened"``, ``"not
            applicable"``, ``"halved"``, ``"promoted"`` (trained longer in a
            later row), ``"rejected"``, ``"passed"`` or ``"accepted"``.
    """

    index: int
    remedies: tuple[Remedy, ...]
    diagnosis: Diagnosis | None
    metric: float
    val_loss: float
    steps: int
    seconds: float
    diverged: bool = False
    accepted: bool = False
    note: str = ""
    progress: float = math.nan
    screened: bool = False
    rung: int | None = None
    stage: str = ""

    @property
    def label(self) -> str:
        """``"original"`` or ``"#k"``."""
        return "original" if self.index == 0 else f"#{self.index}"

    @property
    def names(self) -> list[str]:
        """The remedies' labels, e.g. ``["he_init", "clip_norm(1)"]``."""
        return [label(r) for r in self.remedies]

    @property
    def findings(self) -> list[str]:
        """``"problem (severity)"`` for each remaining finding."""
        if self.diagnosis is None:
            return []
        return [f"{f.problem.value} ({f.severity.value})" for f in self.diagnosis.findings]

    @property
    def healthy(self) -> bool:
        """Trained, and its diagnosis found nothing."""
        return self.trained and self.diagnosis is not None and self.diagnosis.healthy

    @property
    def trained(self) -> bool:
        """It was built and trained (not screened out, and every remedy applied)."""
        return self.diagnosis is not None and not self.screened

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {
            "candidate": self.label,
            "remedies": self.names,
            "findings": self.findings,
            "metric": _plain(self.metric),
            "val_loss": _plain(self.val_loss),
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "diverged": self.diverged,
            "progress": _plain(self.progress),
            "accepted": self.accepted,
            "screened": self.screened,
            "rung": self.rung,
            "stage": self.stage,
            "note": self.note,
        }


@dataclass
class RepairResult:
    """The outcome of :func:`gradmedic.repair`.

    Attributes:
        status: ``"repaired"``, ``"healthy"`` (no repair needed) or ``"unrepaired"``.
        message: One line for a person.
        candidates: Every candidate in the order tried; ``candidates[0]`` is the original.
        accepted: The accepted candidate (None unless repaired).
        model: The model to use: the user's model with the accepted model remedies
            applied, untrained (the user's model itself when nothing was changed).
        trained: The model as trained by the search's short run (accepted candidate,
            else the original).
        setup: The user's setup (unchanged); ``train(setup, remedies, budget=...)``
            reproduces the accepted run.
        snippet: The changes as code to paste into a training script.
        metric: The metric candidates were compared by.
        budget: The per-candidate budget.
        seed: The seed.
        strategy: ``"ranked"`` or ``"random"``.
        seconds: Wall time of the whole search.
        reference: The trivial predictor's score and the bar a fix had to clear
            (None when no trivial predictor fits the targets).
        steps_spent: Training steps the search spent (the original's excluded).
        steps_total: Training steps it could spend (``max_candidates x steps``).
    """

    status: str
    message: str
    candidates: list[Candidate]
    accepted: Candidate | None
    model: nn.Module
    trained: nn.Module
    setup: Setup
    snippet: str
    metric: Metric
    budget: Budget
    seed: int
    strategy: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    reference: Reference | None = None
    steps_spent: int = 0
    steps_total: int = 0

    @property
    def repaired(self) -> bool:
        """True when a candidate was accepted."""
        return self.status == "repaired"

    @property
    def original(self) -> Candidate:
        """The user's setup as trained."""
        return self.candidates[0]

    @property
    def remedies(self) -> tuple[Remedy, ...]:
        """The accepted remedies (empty when nothing was changed)."""
        return self.accepted.remedies if self.accepted is not None else ()

    @property
    def trained_candidates(self) -> int:
        """Candidates trained besides the original."""
        return sum(1 for c in self.candidates[1:] if c.trained)

    @property
    def run_seconds(self) -> float:
        """Seconds of one full training run (``budget.steps`` steps).

        The median over the runs that took every step, else the median time per
        step times the steps.
        """
        runs = [c for c in self.candidates if c.trained and c.steps > 0]
        full = [c.seconds for c in runs if c.steps == self.budget.steps]
        if full:
            return statistics.median(full)
        if runs:
            return statistics.median(c.seconds / c.steps for c in runs) * self.budget.steps
        return math.nan

    @property
    def runs(self) -> float:
        """Total search time in units of one full training run (:attr:`run_seconds`)."""
        return self.seconds / self.run_seconds

    def rows(self) -> list[dict[str, Any]]:
        """The results table as plain dicts."""
        return [c.to_dict() for c in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON (``gradmedic fix --json``)."""
        return {
            "status": self.status,
            "message": self.message,
            "metric": {"name": self.metric.name, "higher_is_better": self.metric.higher_is_better},
            "strategy": self.strategy,
            "seed": self.seed,
            "budget": {
                "steps": self.budget.steps,
                "seconds": self.budget.seconds,
                "total_seconds": self.budget.total_seconds,
            },
            "remedies": [r.to_dict() for r in self.remedies],
            "snippet": self.snippet,
            "candidates": self.rows(),
            "original_findings": (
                self.original.diagnosis.to_dict()["findings"]
                if self.original.diagnosis is not None
                else []
            ),
            "reference": (
                {"name": r.name, "value": r.value, "needed": r.needed}
                if (r := self.reference) is not None
                else None
            ),
            "steps_spent": self.steps_spent,
            "steps_total": self.steps_total,
            "seconds": round(self.seconds, 3),
            "run_seconds": _plain(round(self.run_seconds, 3)),
            "runs": _plain(round(self.runs, 2)),
        }

    def table(self) -> Any:
        """A rich Table: candidate, remedies, findings, metric, time."""
        from rich.table import Table

        arrow = "↑" if self.metric.higher_is_better else "↓"
        table = Table(title=f"gradmedic repair: {self.message}", title_justify="left")
        table.add_column("candidate")
        table.add_column("remedies")
        table.add_column("findings")
        table.add_column("steps", justify="right")
        table.add_column(f"{self.metric.name} {arrow}", justify="right")
        table.add_column("time", justify="right")
        table.add_column("stage")
        table.add_column("verdict")
        for c in self.candidates:
            style = "bold green" if c.accepted else None
            table.add_row(
                c.label,
                " + ".join(c.names) or "-",
                ", ".join(c.findings) or ("none" if c.diagnosis is not None else "-"),
                str(c.steps),
                format_metric(c.metric),
                f"{c.seconds:.2f}s",
                c.stage,
                c.note,
                style=style,
            )
        return table

    def __rich__(self) -> Any:
        """Rich renderable: the table."""
        return self.table()


def format_metric(value: float) -> str:
    """Four significant digits; ``nan``/``inf`` as such."""
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def label(remedy: Remedy) -> str:
    """The name, with the value when the remedy has one number: ``"clip_norm(1)"``."""
    numbers = [
        v for v in remedy.params.values() if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return f"{remedy.name}({numbers[0]:.3g})" if len(numbers) == 1 else remedy.name


def describe(remedies: Sequence[Remedy]) -> str:
    """``"he_init + clip_norm(1)"``."""
    return " + ".join(label(r) for r in remedies)
