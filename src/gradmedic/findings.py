"""What a diagnosis says: problems, findings, remedies, and the diagnosis itself.

These are plain data: detectors build them, renderers (terminal, JSON, HTML)
and the repair search read them.
"""

from __future__ import annotations

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
    """

    problem: Problem
    severity: Severity
    layers: Sequence[str]
    evidence: Mapping[str, Any]
    explanation: str
    remedies: Sequence[Remedy] = ()
    step: int | None = None

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
    """

    findings: list[Finding] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """True when nothing was found."""
        return not self.findings

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
            "findings": [f.to_dict() for f in self.findings],
            "layers": list(self.layers),
            "profile": _plain(self.profile),
            "context": _plain(self.context),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (non-finite numbers become strings)."""
        return json.dumps(self.to_dict(), indent=indent)

    def __rich__(self) -> Any:
        """Rich renderable (terminal view)."""
        from gradmedic.report.terminal import render_diagnosis

        return render_diagnosis(self)


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
