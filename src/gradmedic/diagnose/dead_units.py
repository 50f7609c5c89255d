"""Dead units: a unit whose slope is exactly 0 for every input learns nothing (R3).

A ReLU whose pre-activation is negative for every input outputs 0; the
gradient of its incoming weights and bias is ``phi'(z) * ... = 0`` for every
input, so no step can revive it, and its row of the layer's Jacobian is 0,
so it passes nothing to the layers below either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import lower_lr, setup_of
from gradmedic.diagnose.signals import before_nonfinite
from gradmedic.diagnose.suggest import suggested
from gradmedic.diagnose.units import dead_in, pct, unit_episode, why_unchecked
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog


def remedies(kind: str, trained: bool, lr: Remedy | None = None) -> list[Remedy]:
    """Ranked cures: give dead units a way back, then keep them alive."""
    out = [
        catalog.swap_activation(kind, "LeakyReLU", "slope 0.01 below 0 gives a way back (R3)"),
        catalog.bias_reinit(0.01, "puts the pre-activations back on the active side"),
        catalog.init_scheme("he", "keeps pre-activations at unit scale, half of them positive"),
        catalog.normalization("batch", "centres every unit's pre-activation over the batch (R6)"),
    ]
    if trained:
        out.insert(2, lr or catalog.lower_lr(0.1, "a large step can push a bias far negative (R3)"))
    return out


@register(
    Problem.DEAD_UNITS,
    needs=("activations",),
    why=why_unchecked("dead units"),
)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """Modules with at least ``dead_fraction`` of their units dead, before any NaN/Inf."""
    judged, ep = unit_episode(
        before_nonfinite(rows),
        config.window,
        lambda stats: dead_in(stats, config.dead_fraction),
        lambda d: max(s["dead_fraction"] for s in d.values()),
        "dead_fraction",
    )
    if ep is None:
        return []
    dead = next(d for i, d in reversed(judged) if d)
    worst_name, worst = max(dead.items(), key=lambda kv: kv[1]["dead_fraction"])
    kind = str(worst.get("kind", "ReLU"))
    fractions = {name: s["dead_fraction"] for name, s in dead.items()}
    moments = ""
    if isinstance(worst.get("input_mean"), float) and isinstance(worst.get("input_std"), float):
        moments = f" (pre-activation mean {worst['input_mean']:.2g}, std {worst['input_std']:.2g})"
    text = (
        f"In {len(dead)} activation module(s) at least {pct(config.dead_fraction)} of the units "
        f"output a zero slope for every input; worst {worst_name!r}: "
        f"{pct(worst['dead_fraction'])} of {worst.get('units', '?')} {kind} units{moments}. "
        "A dead unit's incoming weights and bias get zero gradient, so it never recovers, and "
        "it passes no gradient to the layers below."
    )
    step = worst.get("step")
    s = suggested(rows, config)
    lr = lower_lr(
        setup_of(config),
        s.lr_factor,
        f"a large step can push a bias far negative (R3); {s.lr_why}",
        s.lr,
    )
    peak = ep.peak_value if ep.peak_value is not None else worst["dead_fraction"]
    return [
        Finding(
            problem=Problem.DEAD_UNITS,
            severity=(Severity.CRITICAL if peak >= config.dead_critical else Severity.WARNING),
            layers=list(dead),
            evidence={
                "dead_fraction": fractions,
                "units": {name: s.get("units") for name, s in dead.items()},
                "kind": kind,
                "threshold": config.dead_fraction,
            },
            explanation=text,
            remedies=remedies(kind, trained=bool(step), lr=lr),
            step=step,
            episode=ep,
        )
    ]
