"""Unstable updates: optimizer steps too large for the weights they change (K6).

The update ratio ``||dw|| / ||w||`` per layer says how much of a layer one
step rewrites. Healthy training sits around 1e-3..1e-2; a learning rate far
too high shows ratios of 0.3 and more from its first steps, well before the
inflated weights and gradients turn the loss into NaN.

Zero-initialized layers (``param_norm == 0`` at an update: LoRA B matrices,
zero-init residual branches) are set aside (:mod:`gradmedic.diagnose.signals`):
their ratio is a division by zero, then ~1/k while they grow, not a step size.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import Point, episode, larger
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import adaptive_optimizer, lower_lr, setup_of
from gradmedic.diagnose.signals import (
    RatioPoint,
    initial_scale,
    largest,
    ratio_points,
    zero_started,
)
from gradmedic.diagnose.suggest import lr_factor as _lr_factor
from gradmedic.diagnose.suggest import suggested
from gradmedic.findings import Finding, Problem, Severity
from gradmedic.remedies import catalog

Rows = Sequence[Mapping[str, Any]]

__all__ = ["detect", "first_unstable", "judge", "largest", "lr_factor"]


def lr_factor(ratio: float) -> float:
    """A power of ten bringing ``ratio`` to the healthy 1e-2: at least 10x, at most 100x.

    Kept for callers of the old name; :func:`gradmedic.diagnose.suggest.lr_factor`
    is the rule.
    """
    return _lr_factor(ratio)


def judge(points: Sequence[RatioPoint], config: DiagnosisConfig) -> list[tuple[str | None, float]]:
    """For each point, ``(rule, value)``: the rule that holds there, or None.

    ``rule`` is ``"spike"``, ``"sustained"`` or None (then ``value`` is the
    record's own largest ratio).

    A spike is a record with a ratio >= ``update_ratio_spike``; sustained is a
    layer whose median over its last ``update_window`` measurements (at least
    ``min(update_window, 3)`` of them, so that Adam's large first step alone does
    not fire it) is >= ``update_ratio_sustained``. Per layer, because the monitor
    may measure the layers in turn (one group per record): a record's largest
    ratio depends on which group it held.
    """
    need = min(config.update_window, 3)
    seen: dict[str, list[float]] = {}
    medians: dict[str, float] = {}  # per layer, over its last measurements (once it has enough)
    out: list[tuple[str | None, float]] = []
    for p in points:
        for name, value in p.ratios.items():
            values = seen.setdefault(name, [])
            values.append(value)
            if len(values) >= need:  # only the layers this record measured change
                medians[name] = statistics.median(values[-config.update_window :])
        if p.value >= config.update_ratio_spike:
            out.append(("spike", p.value))
            continue
        median = max(medians.values(), default=0.0)
        if median >= config.update_ratio_sustained:
            out.append(("sustained", median))
        else:
            out.append((None, p.value))
    return out


def first_unstable(rows: Rows, config: DiagnosisConfig) -> tuple[int, str, str, float] | None:
    """The earliest record that is unstable: ``(row index, rule, layer, ratio)``."""
    points = ratio_points(rows)
    for p, (rule, value) in zip(points, judge(points, config), strict=True):
        if rule is not None:
            return p.index, rule, p.layer, value
    return None


@register(
    Problem.UNSTABLE_UPDATES,
    needs=("update_ratio",),
    why="no `update_ratio` key: update sizes not measured (watch(..., updates=True), "
    "sampled every update_every steps)",
)
def detect(rows: Rows, config: DiagnosisConfig) -> list[Finding]:
    """The run's episode of update ratios that spike or stay high (see DiagnosisConfig)."""
    points = ratio_points(rows, bounds=True)
    verdicts = judge(points, config)
    marks = [
        Point(p.index, p.step, rule is not None, p.value)
        for p, (rule, _) in zip(points, verdicts, strict=True)
    ]
    ep = episode(marks, larger, "update_ratio")
    if ep is None:
        return []
    k = next(k for k, m in enumerate(marks) if m.bad)
    first, (rule, value) = points[k], verdicts[k]
    assert rule is not None
    row = rows[first.index]
    step = row.get("step")
    layer = first.layer
    if rule == "spike":
        bounded = (row.get("update_ratio_bound") or {}).get(layer) == value
        by = (
            f"by at least {value:.2g} of its own norm (its norm changed that much: the learning "
            "rate jumped at that step)"
            if bounded
            else f"by {value:.2g} of its own norm"
        )
        what = (
            f"At step {step} the optimizer changed layer {layer!r} {by} "
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
    zero = sorted(zero_started(rows))
    if zero:
        text += (
            f" Zero-initialized layers ({', '.join(zero[:4])}{' ...' if len(zero) > 4 else ''}) "
            "are not judged: their ratio has no scale to refer to."
        )
    peak = ep.peak_value if ep.peak_value is not None else value
    s = suggested(rows, config)
    setup = setup_of(config)
    remedies = [
        lower_lr(setup, s.lr_factor, s.lr_why, s.lr or _lr_list(row)),
    ]
    start = initial_scale(rows, layer, config.context)
    tiny = start is not None and 0 < start < TINY_INIT
    if tiny:
        text += (
            f" Layer {layer!r} started from weights of scale {start:.2g} (rms(w) * sqrt(fan_in); "
            "PyTorch's default init gives about 0.6, Xavier 1, He 1.4): a step of ordinary "
            "size is then many times their norm, until they grow. The init, not the learning "
            "rate, is the outlier."
        )
        kind = (config.context.get("activations") or {}).get(layer)
        scheme = "he" if kind in {"ReLU", "LeakyReLU", "PReLU", "ReLU6"} else "xavier"
        remedies.insert(0, catalog.init_scheme(scheme, "starts the weights at a normal scale"))
    if s.clip_norm is not None:
        remedies.append(catalog.clip_norm(s.clip_norm, f"bounds each step: {s.clip_why} (R7)"))
    remedies += [
        adaptive_optimizer(setup, "steps scale with the gradient's running RMS (K6)"),
        catalog.weight_decay(1e-4, "holds back the weight growth that feeds divergence"),
    ]
    return [
        Finding(
            problem=Problem.UNSTABLE_UPDATES,
            severity=(
                Severity.CRITICAL
                if peak >= config.update_ratio_spike and not (tiny and ep.recovery is not None)
                else Severity.WARNING
            ),
            layers=[layer],
            evidence={
                "rule": rule,
                "update_ratio": value,
                "update_ratios": dict(first.ratios),
                "peak_update_ratio": peak,
                "lr": row.get("lr"),
                "threshold": (
                    config.update_ratio_spike if rule == "spike" else config.update_ratio_sustained
                ),
                "zero_initialized": zero,
                "initial_scale": start,
            },
            explanation=text,
            remedies=remedies,
            step=step,
            episode=ep,
        )
    ]


#: A layer starting below this scale (rms(w) * sqrt(fan_in)), 30x under PyTorch's default
#: init, was initialized too small: its first updates are huge relative to it.
TINY_INIT = 0.02


def _lr_list(row: Mapping[str, Any]) -> list[float] | None:
    lr = row.get("lr")
    if isinstance(lr, list | tuple) and all(isinstance(v, int | float) for v in lr):
        return [float(v) for v in lr] or None
    return None
