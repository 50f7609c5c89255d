"""Step-size divergence: the loss climbs several-fold because each step overshoots (K6).

A step ``-lr * g`` that is too long for the curvature lands further up the other
side of the valley than it started: the loss rises, the next gradient is larger,
and the rise compounds until the loss is NaN. The signature differs from
vanishing or exploding through depth:

- the **loss** (``row["loss"]``) rises: the smoothed loss (median of
  ``loss_window`` losses) reaches ``loss_rise`` (3x) its lowest value so far and
  undoes at least ``loss_undo`` (half) of the progress made since the start;
- the per-layer **gradient profile is not geometric** at the onset: no total
  gain beyond ``exploding_gain`` with R^2 >= ``geometric_r2`` (that is the
  exploding detector's finding, which then explains the rise);
- the **update ratios**, where recorded, are far above the healthy ~1e-2 (the
  steps rewrite a large part of the weights); a loss that rises while every
  recorded step stayed below 1e-2 of the weights is not a step-size problem.

Remedies: a concrete lower learning rate (the diagnosis' lr factor, sized from
the update ratios, :mod:`gradmedic.diagnose.suggest`) and warmup when the run
diverged early; clipping only where the run does not already clip (a clipped
run that diverges needs a smaller lr, not a tighter clip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import Point, episode, larger
from gradmedic.diagnose.profile import gain_series, sci
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import lower_lr, setup_of, warmup
from gradmedic.diagnose.signals import loss_points, ratio_points
from gradmedic.diagnose.suggest import suggested
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog

Rows = Sequence[Mapping[str, Any]]

EARLY = 100
"""A divergence whose onset comes within this many steps is early: warmup is offered."""


def depth_at(rows: Rows, index: int, config: DiagnosisConfig) -> Any:
    """The windowed depth fit at the last record with a profile at or before ``index``."""
    series = [
        p for p in gain_series(rows[: index + 1], config.window, config.context.get("layers"))
    ]
    return series[-1] if series else None


@register(
    Problem.DIVERGENCE,
    needs=("loss",),
    why="no `loss` key: step-size divergence not checked (monitor.step(loss=loss) or "
    "monitor.note_loss(loss))",
)
def detect(rows: Rows, config: DiagnosisConfig) -> list[Finding]:
    """The run's episode of a several-fold loss rise not explained by depth (module docstring)."""
    losses = loss_points(rows, config)
    points = [
        Point(p.index, p.step, p.rising, p.ratio if p.ratio is not None else math.nan)
        for p in losses
        if p.smoothed is not None or p.rising
    ]
    ep = episode(points, larger, "loss_ratio")
    if ep is None:
        return []
    onset = next(p for p in losses if p.rising)
    depth = depth_at(rows, onset.index, config)
    geometric_explosion = (
        depth is not None
        and depth.total_gain > config.exploding_gain
        and depth.r2 >= config.geometric_r2
    )
    if geometric_explosion:
        return []  # the exploding detector's finding; the rise is its consequence
    recent = [p for p in ratio_points(rows) if p.index <= onset.index][-config.update_window :]
    ratio = max((p.value for p in recent), default=None)
    if ratio is not None and ratio < config.update_ratio_healthy:
        return []  # every recorded step was small: not a step-size divergence
    peak = max((p for p in losses if p.index >= onset.index and p.index <= _last(losses)),
               key=lambda p: p.loss if math.isfinite(p.loss) else math.inf)  # fmt: skip
    s = suggested(rows, config)
    setup = setup_of(config)
    lr = s.lr or (list(setup.lr) or None)
    clipped = s.existing_clip
    nonfinite = any(not math.isfinite(p.loss) for p in losses if p.index >= onset.index)
    peak_ratio = ep.peak_value if ep.peak_value is not None else onset.ratio
    sentences = [
        f"The loss rose from its low of {onset.low:.3g} (step {onset.low_step}) to "
        f"{onset.smoothed:.3g} at step {onset.step} ({onset.ratio:.3g}x, median of the last "
        f"{config.loss_window} losses)"
        + (
            f" and reached {peak.loss:.3g} at step {peak.step}"
            if peak.step != onset.step and math.isfinite(peak.loss)
            else ""
        )
        + (" before turning NaN/Inf" if nonfinite else "")
        + "."
    ]
    if depth is not None:
        shape = (
            f"is not a product through depth (R^2 {depth.r2:.2f} of a fit over {depth.layers} "
            f"layers, total gain {sci(depth.total_gain)})"
            if depth.r2 < config.geometric_r2
            else f"changes {sci(depth.total_gain)}x over {depth.layers} layers, within the "
            f"{sci(config.exploding_gain)}x of an explosion"
        )
        sentences.append(
            f"At the onset the per-layer gradient profile {shape}, so exploding gradients do not "
            "explain the rise."
        )
    if ratio is not None:
        sentences.append(
            f"Up to the onset the largest update ratio ||dw||/||w|| was {ratio:.2g}, where healthy "
            f"steps move weights by 1e-3..{config.update_ratio_healthy:g} of their norm."
        )
    if clipped is not None:
        sentences.append(
            f"The gradient is already clipped at {clipped:.3g}, so each step is lr x {clipped:.3g}"
            " long at most: that is still too long."
        )
    sentences.append(
        "Each step overshoots the minimum along the sharpest direction and lands higher than it "
        "started; the larger gradient there makes the next step longer (K6)."
    )
    remedies: list[Remedy] = [
        lower_lr(setup, s.lr_factor, s.lr_why, lr),
    ]
    if onset.step < EARLY and not _ramped(rows, onset.index):
        steps = max(EARLY, 10 * (onset.step + 1))
        remedies.append(
            warmup(
                setup, s.lr_factor, steps,
                f"the loss diverged at step {onset.step}, before the curvature and "
                "the optimizer's statistics settled",
            )
        )  # fmt: skip
    if s.clip_norm is not None:
        remedies.append(catalog.clip_norm(s.clip_norm, f"bounds each step: {s.clip_why} (R7)"))
    critical = nonfinite or (peak_ratio is not None and peak_ratio >= config.loss_rise**2)
    evidence: dict[str, Any] = {
        "onset_step": onset.step,
        "low": onset.low,
        "low_step": onset.low_step,
        "smoothed_loss": onset.smoothed,
        "loss_ratio": onset.ratio,
        "peak_loss": peak.loss,
        "peak_step": peak.step,
        "peak_loss_ratio": peak_ratio,
        "threshold": config.loss_rise,
        "nonfinite": nonfinite,
        "max_update_ratio": ratio,
        "depth_total_gain": depth.total_gain if depth is not None else None,
        "depth_r2": depth.r2 if depth is not None else None,
        "lr": lr,
        "suggested_lr": [v * s.lr_factor for v in lr] if lr else None,
        "existing_clip": clipped,
    }
    return [
        Finding(
            problem=Problem.DIVERGENCE,
            severity=Severity.CRITICAL if critical else Severity.WARNING,
            layers=[],
            evidence=evidence,
            explanation=" ".join(sentences),
            remedies=remedies,
            step=onset.step,
            episode=ep,
        )
    ]


def _last(losses: Sequence[Any]) -> int:
    rising = [p.index for p in losses if p.rising]
    return rising[-1] if rising else losses[-1].index


def _ramped(rows: Rows, index: int) -> bool:
    """Whether the recorded learning rate rose before ``index`` (a warmup already runs)."""
    seen = [
        float(lr[0]) if isinstance(lr, list | tuple) and lr else float(lr)
        for r in rows[: index + 1]
        if isinstance(lr := r.get("lr"), list | tuple | int | float) and not isinstance(lr, bool)
        and (not isinstance(lr, list | tuple) or lr)
    ]  # fmt: skip
    return len(seen) >= 2 and max(seen) > seen[0] * (1 + 1e-9)
