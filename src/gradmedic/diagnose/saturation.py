"""Saturation: bounded activations evaluated where their slope is near 0 (K2, K3).

``sigma'(z) = sigma(z)(1 - sigma(z))`` and ``tanh'(z) = 1 - tanh(z)^2`` tend to
0 as ``|z|`` grows; a unit evaluated there multiplies the gradient passing
through it by almost 0 and its incoming weights barely learn.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.units import SATURATING, pct, unit_stats
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog


def remedies(kind: str) -> list[Remedy]:
    """Ranked cures: bring the pre-activations back into the linear range."""
    return [
        catalog.normalization("batch", "keeps pre-activations at zero mean, unit variance (R6)"),
        catalog.init_scheme("xavier", "weights sized so pre-activations stay O(1) (R4)"),
        catalog.swap_activation(kind, "ReLU", "ReLU does not saturate for positive inputs (R2)"),
    ]


@register(Problem.SATURATION)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """Bounded activations with at least ``saturation_fraction`` of near-zero slopes."""
    stats = unit_stats(rows, config.window)
    hit = {
        name: s
        for name, s in stats.items()
        if s.get("kind") in SATURATING
        and s.get("saturated_fraction", 0.0) >= config.saturation_fraction
    }
    if not hit:
        return []
    kinds = [str(s["kind"]) for s in hit.values()]
    kind = max(set(kinds), key=kinds.count)
    fractions = {name: s["saturated_fraction"] for name, s in hit.items()}
    mean = statistics.fmean(fractions.values())
    worst_name = max(fractions, key=fractions.__getitem__)
    worst = hit[worst_name]
    std = worst.get("input_std")
    spread = f" (pre-activation std {std:.2g})" if isinstance(std, float) else ""
    slope = worst.get("mean_slope")
    slope_txt = (
        f"; its mean slope is {slope:.2g} of the maximum" if isinstance(slope, float) else ""
    )
    text = (
        f"In {len(hit)} {kind} module(s), on average {pct(mean)} of the evaluations have a slope "
        f"below {pct(config.saturation_slope)} of the activation's maximum; worst "
        f"{worst_name!r} at {pct(fractions[worst_name])}{spread}{slope_txt}. Each saturated unit "
        "multiplies the gradient through it by almost 0, so its weights barely learn."
    )
    return [
        Finding(
            problem=Problem.SATURATION,
            severity=Severity.CRITICAL if mean >= 0.9 else Severity.WARNING,
            layers=list(hit),
            evidence={
                "saturated_fraction": fractions,
                "mean_saturated_fraction": mean,
                "kind": kind,
                "slope_rule": config.saturation_slope,
                "threshold": config.saturation_fraction,
            },
            explanation=text,
            remedies=remedies(kind),
            step=worst.get("step"),
        )
    ]
