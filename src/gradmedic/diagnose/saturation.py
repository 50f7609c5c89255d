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
from gradmedic.diagnose.units import (
    pct,
    saturated_in,
    unit_episode,
    why_unchecked,
    with_slope_rule,
)
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog


def remedies(kind: str) -> list[Remedy]:
    """Ranked cures: bring the pre-activations back into the linear range."""
    return [
        catalog.normalization("batch", "keeps pre-activations at zero mean, unit variance (R6)"),
        catalog.init_scheme("xavier", "weights sized so pre-activations stay O(1) (R4)"),
        catalog.swap_activation(kind, "ReLU", "ReLU does not saturate for positive inputs (R2)"),
    ]


@register(
    Problem.SATURATION,
    needs=("activations",),
    why=why_unchecked("saturated units"),
)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """Bounded activations with ``saturation_fraction`` of near-zero slopes, over the run."""
    rows = with_slope_rule(rows, config.saturation_slope)
    judged, ep = unit_episode(
        rows,
        config.window,
        lambda stats: saturated_in(stats, config.saturation_fraction),
        lambda h: statistics.fmean(s["saturated_fraction"] for s in h.values()),
        "mean_saturated_fraction",
    )
    if ep is None:
        return []
    hit = next(h for _, h in reversed(judged) if h)
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
            severity=Severity.CRITICAL
            if max(mean, ep.peak_value or 0.0) >= config.saturation_critical
            else Severity.WARNING,
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
            episode=ep,
        )
    ]
