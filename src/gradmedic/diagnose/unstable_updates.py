"""Unstable updates: optimizer steps too large for the weights they change (K6).

The update ratio ``||dw|| / ||w||`` per layer says how much of a layer one
step rewrites. Healthy training sits around 1e-3..1e-2; a learning rate far
too high shows ratios of 0.3 and more from its first steps, well before the
inflated weights and gradients turn the loss into NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.registry import register
from gradmedic.findings import Finding, Problem, Severity
from gradmedic.remedies import catalog

Rows = Sequence[Mapping[str, Any]]

_HEALTHY = 1e-2  # top of the healthy range of update ratios


def largest(ratios: Mapping[str, float]) -> tuple[str, float]:
    """The layer with the largest ratio (a NaN counts as infinite)."""
    name = max(ratios, key=lambda n: math.inf if math.isnan(ratios[n]) else ratios[n])
    value = ratios[name]
    return name, math.inf if math.isnan(value) else value


def first_unstable(rows: Rows, config: DiagnosisConfig) -> tuple[int, str, str, float] | None:
    """The earliest record that is unstable: ``(row index, rule, layer, ratio)``."""
    sampled = [(i, largest(r["update_ratio"])) for i, r in enumerate(rows) if r.get("update_ratio")]
    need = min(config.update_window, 3)
    for k, (i, (name, value)) in enumerate(sampled):
        if value >= config.update_ratio_spike:
            return i, "spike", name, value
        window = [v for _, (_, v) in sampled[max(0, k - config.update_window + 1) : k + 1]]
        if len(window) >= need and statistics.median(window) >= config.update_ratio_sustained:
            return i, "sustained", name, statistics.median(window)
    return None


def lr_factor(ratio: float) -> float:
    """A power of ten that brings ``ratio`` down to the healthy 1e-2 (at least 10x lower)."""
    if not math.isfinite(ratio):
        return 0.01
    return min(0.1, 10.0 ** math.floor(math.log10(_HEALTHY / ratio)))


def clip_threshold(rows: Rows) -> float:
    """Median global gradient norm of the records before instability (1.0 without any)."""
    norms = [
        r["global_grad_norm"]
        for r in rows
        if isinstance(r.get("global_grad_norm"), float) and math.isfinite(r["global_grad_norm"])
    ]
    return statistics.median(norms) if norms else 1.0


@register(Problem.UNSTABLE_UPDATES)
def detect(rows: Rows, config: DiagnosisConfig) -> list[Finding]:
    """The first record whose update ratio spikes or stays high (see DiagnosisConfig)."""
    hit = first_unstable(rows, config)
    if hit is None:
        return []
    i, rule, layer, value = hit
    row = rows[i]
    ratios = dict(row["update_ratio"])
    step = row.get("step")
    if rule == "spike":
        what = (
            f"At step {step} the optimizer changed layer {layer!r} by {value:.2g} of its own norm "
            f"(||dw||/||w|| >= {config.update_ratio_spike:g})"
        )
    else:
        what = (
            f"Up to step {step} the largest per-layer update ratio ||dw||/||w|| had a median of "
            f"{value:.2g} over the last records (>= {config.update_ratio_sustained:g})"
        )
    text = (
        f"{what}, where healthy training moves weights by 1e-3..1e-2 of their norm per step. "
        "Steps this large overshoot the minimum and inflate the weights, which inflates the "
        "gradients: the loss oscillates or diverges (K6)."
    )
    factor = lr_factor(value)
    lr = row.get("lr")
    return [
        Finding(
            problem=Problem.UNSTABLE_UPDATES,
            severity=Severity.CRITICAL if value >= config.update_ratio_spike else Severity.WARNING,
            layers=[layer],
            evidence={
                "rule": rule,
                "update_ratio": value,
                "update_ratios": ratios,
                "lr": lr,
                "threshold": (
                    config.update_ratio_spike if rule == "spike" else config.update_ratio_sustained
                ),
            },
            explanation=text,
            remedies=[
                catalog.lower_lr(factor, f"brings the update ratio from {value:.2g} toward 1e-2"),
                catalog.clip_norm(clip_threshold(rows[: i + 1]), "bounds each step (R7)"),
                catalog.adaptive_optimizer("steps scale with the gradient's running RMS (K6)"),
                catalog.weight_decay(1e-4, "holds back the weight growth that feeds divergence"),
            ],
            step=step,
        )
    ]
