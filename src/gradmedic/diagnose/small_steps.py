"""Small steps: an optimizer whose updates are too small for the model to learn.

The mirror of :mod:`gradmedic.diagnose.unstable_updates`. Healthy training moves
each layer by about 1e-3..1e-2 of its norm per step (``||dw|| / ||w||``); a
learning rate far too small moves even the fastest layer by less than a
hundredth of that, and the loss stays where it started. Both must hold: the
fastest layer's ratio (each layer's median over the records that measured it)
is below ``update_ratio_small`` (1e-4) *and* the loss fell by at most 10% (the last
tenth of the records over the first tenth, ``small_steps_loss``), so a run that
learns with small but sufficient steps is not a finding. When the gradient
vanishes through depth the steps are small because the gradient is: that is the
vanishing finding, whose cures (activation, init, normalization) come first, and
raising the lr would not reach the starved layers; no small-steps finding then.

The remedy raises the learning rate by the factor that brings the measured
ratio toward the middle of the healthy band (``sqrt(1e-3 * 1e-2)``, 3.2e-3),
snapped to 3x, 10x, 30x or 100x and bounded by ``lr_raise_bounds``; or an
adaptive optimizer, whose step does not depend on the gradient's scale.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import adaptive_optimizer, setup_of
from gradmedic.diagnose.signals import RatioPoint, ratio_points
from gradmedic.diagnose.suggest import lr_at
from gradmedic.diagnose.vanishing import detect as vanishing
from gradmedic.findings import Finding, Problem, Severity
from gradmedic.remedies import catalog

Rows = Sequence[Mapping[str, Any]]

MIN_RECORDS = 5  # one preflight step says nothing about the step size of a run
LADDER = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)

__all__ = ["detect", "fastest", "loss_fall", "raise_factor"]


def raise_factor(ratio: float, target: float, bounds: tuple[float, float] = (3.0, 100.0)) -> float:
    """The largest of 3, 10, 30, 100... not above ``target / ratio``, within ``bounds``.

    Example:
        >>> raise_factor(2e-4, 1e-2), raise_factor(3.6e-5, 1e-2), raise_factor(1e-12, 1e-2)
        (30.0, 100.0, 100.0)
    """
    low, high = bounds
    if not (math.isfinite(ratio) and ratio > 0):
        return float(low)
    wanted = target / ratio
    factor = max((f for f in LADDER if f <= wanted * (1 + 1e-9)), default=low)
    return float(min(high, max(low, factor)))


def fastest(points: Sequence[RatioPoint]) -> tuple[str, float]:
    """The layer whose median update ratio is largest, and that median.

    Each layer's median is over the records that measured it: the updates probe
    may measure the layers in turn, one group per record, so the largest ratio
    *of a record* would depend on which group it held.

    Example:
        >>> from gradmedic.diagnose.signals import RatioPoint
        >>> pts = [RatioPoint(i, i, "b", v, {"a": 1e-5, "b": v}) for i, v in enumerate([1, 3, 2])]
        >>> fastest(pts)
        ('b', 2)
    """
    seen: dict[str, list[float]] = {}
    for p in points:
        for name, value in p.ratios.items():
            if math.isfinite(value):
                seen.setdefault(name, []).append(value)
    medians = {name: statistics.median(values) for name, values in seen.items()}
    return max(medians.items(), key=lambda kv: kv[1])


def loss_fall(rows: Rows) -> float | None:
    """Mean finite loss of the last tenth of the records over the first tenth's (None: unknown)."""
    losses = [
        float(v)
        for r in rows
        if isinstance(v := r.get("loss"), int | float) and not isinstance(v, bool)
    ]
    if any(not math.isfinite(v) for v in losses):
        return None
    k = len(losses) // 10
    if k == 0:
        return None
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last / first if first > 0 else None


@register(
    Problem.SMALL_STEPS,
    needs=("update_ratio",),
    why="no `update_ratio` key: update sizes not measured (watch(..., updates=True))",
)
def detect(rows: Rows, config: DiagnosisConfig) -> list[Finding]:
    """The run's steps are far below the healthy band and its loss does not fall."""
    points = [p for p in ratio_points(rows) if math.isfinite(p.value)]
    if len(points) < MIN_RECORDS:
        return []
    layer, median = fastest(points)
    if median >= config.update_ratio_small:
        return []
    fall = loss_fall(rows)
    if fall is None or fall < config.small_steps_loss:
        return []
    if vanishing(rows, config):
        return []  # the gradient, not the lr, is what is small: the vanishing finding's cure
    target = math.sqrt(config.update_ratio_healthy / 10 * config.update_ratio_healthy)
    factor = raise_factor(median, target, config.lr_raise_bounds)
    setup = setup_of(config)
    lr = list(setup.lr) or _lr(rows)
    text = (
        f"The fastest layer's update ratio ||dw||/||w|| ({layer!r}) had a median of "
        f"{median:.2g} over {len(points)} records, below {config.update_ratio_small:g} "
        "(healthy training moves weights by 1e-3..1e-2 of their norm per step), and the loss "
        f"ended at {fall:.3g}x its start: the steps are too small to learn in."
    )
    why = (
        f"brings the median largest update ratio {median:.2g} toward {target:.2g} "
        f"(3x/10x/30x/100x, within {config.lr_raise_bounds[0]:g}-{config.lr_raise_bounds[1]:g}x)"
    )
    remedies = [catalog.raise_lr(factor, why, lr=lr)]
    if not setup.adaptive:
        remedies.append(
            adaptive_optimizer(setup, "its step size does not depend on the gradient's scale")
        )
    return [
        Finding(
            problem=Problem.SMALL_STEPS,
            severity=Severity.WARNING,
            layers=[layer],
            evidence={
                "median_update_ratio": median,
                "records": len(points),
                "loss_fall": fall,
                "threshold": config.update_ratio_small,
                "lr_factor": factor,
                "lr": lr,
            },
            explanation=text,
            remedies=remedies,
            step=points[-1].step,
        )
    ]


def _lr(rows: Rows) -> list[float] | None:
    return lr_at(rows, len(rows) - 1)
