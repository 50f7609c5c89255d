"""What a diagnosis says: problems, findings, remedies, and the diagnosis itself.

These are plain data: detectors build them, renderers (terminal, JSON, HTML)
and the repair search read them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Problem(str, Enum):
    """The gradient pathologies gradmedic knows how to detect."""

    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NONFINITE = "nonfinite"
    DEAD_UNITS = "dead_units"
    SATURATION = "saturation"
    VANISHING_IN_TIME = "vanishing_in_time"
    EXPLODING_IN_TIME = "exploding_in_time"
    UNSTABLE_UPDATES = "unstable_updates"
    DIVERGENCE = "divergence"
    SMALL_STEPS = "small_steps"

    def __str__(self) -> str:
        return self.value


class Severity(str, Enum):
    """How urgently a finding needs attention."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        """Ordering key: higher is more severe."""
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


@dataclass(frozen=True)
class Remedy:
    """One way to cure a finding, naming the gradmedic call that applies it.

    Attributes:
        name: Short identifier, e.g. ``"he_init"`` (used by the repair search).
        description: One sentence for a person.
        call: The Python call that applies it, e.g.
            ``"gradmedic.init.apply(model, 'he')"``.
        params: Arguments of the call, as plain data, for programmatic use.
    """

    name: str
    description: str
    call: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {
            "name": self.name,
            "description": self.description,
            "call": self.call,
            "params": _plain(dict(self.params)),
        }


@dataclass(frozen=True)
class Episode:
    """When a problem held during the recorded run (docs/diagnosis.md, "Episodes").

    Attributes:
        onset: Step of the first record where the problem held.
        peak: Step of the record where it was most extreme.
        peak_value: The detector's measure at ``peak`` (named by ``measure``).
        last: Step of the last record where it held.
        recovery: Step of the first measured record after ``last`` where it no
            longer held; None when it still held at the last measured record.
        records: How many measured records it held on.
        measure: What ``peak_value`` is, e.g. ``"total_gain"`` or ``"loss_ratio"``.
    """

    onset: int | None
    peak: int | None
    peak_value: float | None
    last: int | None
    recovery: int | None = None
    records: int = 1
    measure: str = ""

    @property
    def recovered(self) -> bool:
        """Whether the problem stopped before the end of the record."""
        return self.recovery is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return _plain(dataclasses.asdict(self))


@dataclass(frozen=True)
class ChainLink:
    """One problem of a root-cause chain: which, from which step, where."""

    problem: Problem
    step: int | None
    layers: Sequence[str] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {"problem": self.problem.value, "step": self.step, "layers": list(self.layers)}


@dataclass(frozen=True)
class Coverage:
    """What the diagnosis had to go on.

    Attributes:
        steps: Records diagnosed (skipped iterations excluded).
        first_step: Step of the first record (None without records).
        last_step: Step of the last record.
        skipped: Iterations the optimizer skipped (a GradScaler found inf/NaN).
        keys: Record key -> how many records hold it (docs/architecture.md).
        not_checked: Problem -> why it was not checked (a record key missing).
        notes: What the detectors set aside, and why (e.g. zero-initialized layers).
        checked: The problems whose evidence was recorded (None: unknown).
        unreached: Trainable layers no record holds a gradient for, when they are more
            than half of them (a model mostly cut off from its loss); else empty.
    """

    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    skipped: int = 0
    keys: Mapping[str, int] = field(default_factory=dict)
    not_checked: Mapping[str, str] = field(default_factory=dict)
    notes: Sequence[str] = ()
    checked: Sequence[str] | None = None
    unreached: Sequence[str] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {
            "checked": list(self.checked) if self.checked is not None else None,
            "steps": self.steps,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "skipped": self.skipped,
            "keys": dict(self.keys),
            "not_checked": dict(self.not_checked),
            "notes": list(self.notes),
            "unreached": list(self.unreached),
        }


@dataclass(frozen=True)
class Finding:
    """A named problem with its evidence, explanation and ranked remedies.

    Attributes:
        problem: Which pathology.
        severity: How bad.
        layers: The layers (qualified module names) involved, input side first.
        evidence: The numbers behind the finding, each re-derivable from the
            recorded history.
        explanation: The chain-rule reason, with the measured numbers.
        remedies: Ranked cures, best first.
        step: The training step the evidence comes from (None for a preflight).
        episode: When the problem held over the run: onset, peak, recovery
            (None for findings not made from recorded rows).
        cause: The problem this one is a consequence of (the root of the
            diagnosis' chain), or None.
    """

    problem: Problem
    severity: Severity
    layers: Sequence[str]
    evidence: Mapping[str, Any]
    explanation: str
    remedies: Sequence[Remedy] = ()
    step: int | None = None
    episode: Episode | None = None
    cause: Problem | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {
            "problem": self.problem.value,
            "severity": self.severity.value,
            "layers": list(self.layers),
            "evidence": _plain(dict(self.evidence)),
            "explanation": self.explanation,
            "remedies": [r.to_dict() for r in self.remedies],
            "step": self.step,
            "episode": self.episode.to_dict() if self.episode is not None else None,
            "cause": self.cause.value if self.cause is not None else None,
        }


@dataclass
class Diagnosis:
    """The findings for one model or one recorded run.

    Attributes:
        findings: The problems found, most severe first.
        layers: All monitored layers, input side first.
        profile: Per-layer numbers for the terminal/HTML bar view, e.g.
            ``{"grad_norm": {layer: float}, "delta_norm": {...}}``.
        context: Extra data (theory prediction, time profile, ...).
        coverage: What was recorded and what could not be checked (None when
            the diagnosis was not made from recorded rows).
        chain: The root-cause chain, first cause first (empty when no problem
            led to another).
        suggested: The numbers the remedies use (clip threshold, learning-rate
            factor) with their derivation, one rule for the whole diagnosis.
        warnings: Sentences about the diagnosis itself (e.g. nothing recorded).
    """

    findings: list[Finding] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    coverage: Coverage | None = None
    chain: list[ChainLink] = field(default_factory=list)
    suggested: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"healthy"``, ``"findings"``, or why nothing could be diagnosed.

        ``"no_records"``: no step was recorded; ``"nothing_checked"``: records
        exist but none holds what any detector reads; ``"not_reached"``: more than half of
        the trainable layers never received a gradient (``coverage.unreached``).
        None of these is healthy.
        """
        if self.findings:
            return "findings"
        cov = self.coverage
        if cov is not None:
            if cov.steps == 0:
                return "no_records"
            if cov.checked is not None and not cov.checked:
                return "nothing_checked"
            if cov.unreached:
                return "not_reached"
        return "healthy"

    @property
    def healthy(self) -> bool:
        """True when records were diagnosed and nothing was found."""
        return self.status == "healthy"

    @property
    def root_cause(self) -> Finding | None:
        """The finding at the head of the chain (None without a chain)."""
        if not self.chain:
            return None
        return next((f for f in self.findings if f.problem == self.chain[0].problem), None)

    @property
    def problems(self) -> set[Problem]:
        """The set of problems found."""
        return {f.problem for f in self.findings}

    def has(self, problem: Problem | str) -> bool:
        """Whether a finding of this problem is present."""
        return Problem(problem) in self.problems

    def by_problem(self, problem: Problem | str) -> list[Finding]:
        """The findings of one problem."""
        p = Problem(problem)
        return [f for f in self.findings if f.problem == p]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {
            "healthy": self.healthy,
            "status": self.status,
            "findings": [f.to_dict() for f in self.findings],
            "layers": list(self.layers),
            "profile": _plain(self.profile),
            "context": _plain(self.context),
            "coverage": self.coverage.to_dict() if self.coverage is not None else None,
            "chain": [link.to_dict() for link in self.chain],
            "suggested": _plain(self.suggested),
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (non-finite numbers become strings)."""
        return json.dumps(self.to_dict(), indent=indent)

    def __rich__(self) -> Any:
        """Rich renderable (terminal view)."""
        from gradmedic.report.terminal import render_diagnosis  # lazy: the renderer imports us

        return render_diagnosis(self)

    def __str__(self) -> str:
        """A short summary: status, then each finding with its key number and first remedy."""
        from gradmedic.report.summary import summary_text

        return summary_text(self)

    def _repr_html_(self) -> str:
        """The short summary as HTML, for notebooks."""
        from gradmedic.report.summary import summary_html

        return summary_html(self)


def _plain(value: Any) -> Any:
    """Convert numbers, enums, tensors and containers to JSON-safe data."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)
