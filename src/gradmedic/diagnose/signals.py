"""Per-record signals shared by several detectors.

Non-finite records, gradient norms before clipping, update ratios with
zero-initialized layers set aside, and the smoothed loss of the divergence rule.

Zero-initialized parameters (LoRA's B matrices, the last layer of a zero-init
residual branch, BatchNorm gammas at 0) have ``||w|| = 0`` at their first update:
the recorded ratio ``||dw|| / max(||w||, 1e-30)`` is then ~1e27, a division by
zero, not a step size. After that a parameter grown from 0 along a steady
direction has ``||w_k|| ~ k ||dw||``, so its ratio is ~1/k whatever the
learning rate: it counts the steps taken, not their size. Such a layer is set
aside from the update-ratio rules from its first record with ``param_norm == 0``
on; a step too large for it still shows in the loss (the divergence rule).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import row_step

Rows = Sequence[Mapping[str, Any]]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def nonfinite_row(row: Mapping[str, Any]) -> bool:
    """Whether a record holds NaN/Inf: its origin, loss, global or per-layer gradient norm."""
    if row.get("nonfinite_origin"):
        return True
    for key in ("loss", "global_grad_norm"):
        v = _num(row.get(key))
        if v is not None and not math.isfinite(v):
            return True
    grads = row.get("grad_norm") or {}
    return any((v := _num(x)) is not None and not math.isfinite(v) for x in grads.values())


def before_nonfinite(rows: Rows) -> Rows:
    """The records before the first one holding NaN/Inf (all of them if none does).

    What units do after the network went non-finite says nothing about them: a NaN
    pre-activation is no unit's slope.
    """
    for i, row in enumerate(rows):
        if nonfinite_row(row):
            return rows[:i]
    return rows


def clip_info(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record's ``clip`` entry, or an empty mapping."""
    clip = row.get("clip")
    return clip if isinstance(clip, Mapping) else {}


def grad_norm(row: Mapping[str, Any]) -> float | None:
    """The global gradient norm before any clipping.

    ``clip.pre_norm``/``clip.total_norm`` when clipping changed the gradients,
    else ``global_grad_norm``.
    """
    clip = clip_info(row)
    for key in ("pre_norm", "total_norm"):
        v = _num(clip.get(key))
        if v is not None:
            return v
    return _num(row.get("global_grad_norm"))


def existing_clip(rows: Rows) -> float | None:
    """The threshold the run already clips the global norm at, if it visibly does.

    From gradmedic's clipping (``clip.threshold``), from a clip whose pre- and
    post-clip norms differ (``clip.post_norm`` is then the threshold), or, for
    runs recorded without the ``clip`` entry, from at least three recorded
    global norms that are all equal to 1e-6: an unclipped gradient never has
    the same norm twice, a clipped one has the threshold every time.
    """
    seen: list[float] = []
    for row in rows:
        clip = clip_info(row)
        t = _num(clip.get("threshold"))
        if t is not None and t > 0:
            return t
        pre, post = _num(clip.get("pre_norm")), _num(clip.get("post_norm"))
        if pre is not None and post is not None and math.isfinite(pre) and post < pre * (1 - 1e-6):
            seen.append(post)
    if seen:
        return max(seen)
    norms = [
        v
        for r in rows
        if not clip_info(r)
        and (v := _num(r.get("global_grad_norm"))) is not None
        and math.isfinite(v)
        and v > 0
    ]
    if len(norms) >= 3 and max(norms) - min(norms) <= 1e-6 * max(norms):
        return max(norms)
    return None


# ---- update ratios --------------------------------------------------------------------


def initial_scale(rows: Rows, layer: str, context: Mapping[str, Any]) -> float | None:
    """``rms(w) * sqrt(fan_in)`` of ``layer`` at its first recorded ``param_norm``.

    The same measure as ``weight_scale`` (about 0.6 for PyTorch's default init, 1 for
    Xavier, 1.4 for He), from the record instead of the model as it is now: what
    the layer started from. None when unknown.
    """
    size = (context.get("layer_size") or {}).get(layer)
    if not size or not size[0]:
        return None
    for row in rows:
        value = _num((row.get("param_norm") or {}).get(layer))
        if value is not None:
            return value / math.sqrt(size[0]) * math.sqrt(size[1])
    return None


def zero_started(rows: Rows) -> dict[str, int]:
    """Layer -> row index of its first record with ``param_norm == 0`` (zero-initialized)."""
    out: dict[str, int] = {}
    for i, row in enumerate(rows):
        for name, v in (row.get("param_norm") or {}).items():
            if name not in out and _num(v) == 0.0:
                out[name] = i
    return out


def ratios(
    row: Mapping[str, Any], index: int, zero: Mapping[str, int], bounds: bool = False
) -> dict[str, float]:
    """The record's update ratios without the layers set aside as zero-initialized.

    ``bounds``: also the lower bounds read on a step whose learning rate jumped
    (``update_ratio_bound``), where they exceed the measured ratio (spikes only: a lower
    bound says nothing about steps too small).

    A non-finite ratio on a record whose gradients are already non-finite (a NaN
    batch, a NaN made in the forward pass) says nothing about the step size: it is
    the non-finite problem's consequence, and is left out. With finite gradients a
    non-finite update is a step that overflowed, and counts as infinite.
    """
    bad_grads = not _grads_finite(row)
    out = {}
    for name, v in (row.get("update_ratio") or {}).items():
        if name in zero and index >= zero[name]:
            continue
        x = _num(v)
        if x is not None and not (bad_grads and not math.isfinite(x)):
            out[name] = x
    for name, v in (row.get("update_ratio_bound") or {}).items() if bounds else ():
        x = _num(v)
        if x is not None and math.isfinite(x) and x > out.get(name, -math.inf):
            if not (name in zero and index >= zero[name]):
                out[name] = x
    return out


def _grads_finite(row: Mapping[str, Any]) -> bool:
    total = _num(row.get("global_grad_norm"))
    if total is not None and not math.isfinite(total):
        return False
    counts = row.get("grad_nonfinite") or {}
    return not any((_num(c) or 0) > 0 for c in counts.values())


def largest(values: Mapping[str, float]) -> tuple[str, float]:
    """The layer with the largest ratio (a NaN counts as infinite)."""
    name = max(values, key=lambda n: math.inf if math.isnan(values[n]) else values[n])
    value = values[name]
    return name, math.inf if math.isnan(value) else value


@dataclass(frozen=True)
class RatioPoint:
    """The largest judged update ratio of one record."""

    index: int
    step: int
    layer: str
    value: float
    ratios: Mapping[str, float]


def ratio_points(rows: Rows, bounds: bool = False) -> list[RatioPoint]:
    """One point per record with update ratios left after setting zero-init layers aside.

    ``bounds``: with the lower bounds of jumped-lr steps (see :func:`ratios`).
    """
    zero = zero_started(rows)
    out = []
    for i, row in enumerate(rows):
        judged = ratios(row, i, zero, bounds)
        if judged:
            name, value = largest(judged)
            out.append(RatioPoint(i, row_step(row, i), name, value, judged))
    return out


# ---- the loss -------------------------------------------------------------------------


@dataclass(frozen=True)
class LossPoint:
    """The divergence rule at one record with a loss.

    Attributes:
        index: Row index.
        step: Step.
        loss: The record's loss.
        smoothed: Median of the last ``loss_window`` finite losses up to here
            (None for a non-finite loss).
        low: Lowest smoothed loss before this record (None at the first).
        low_step: Step of that low.
        ratio: ``smoothed / low`` (inf for a non-finite loss after a rise).
        rising: Whether the rule holds: ``smoothed >= loss_rise * low`` and the
            rise undoes ``loss_undo`` of the progress made since the start.
    """

    index: int
    step: int
    loss: float
    smoothed: float | None
    low: float | None
    low_step: int | None
    ratio: float | None
    rising: bool


def loss_points(rows: Rows, config: DiagnosisConfig) -> list[LossPoint]:
    """The smoothed-loss rule at every record with a loss (``[]`` if a loss is <= 0).

    A non-finite loss right after a rising record continues the rise (ratio
    inf); one after a calm record is the non-finite detector's alone.
    """
    window, rise, undo = config.loss_window, config.loss_rise, config.loss_undo
    series = [
        (i, row_step(r, i), v) for i, r in enumerate(rows) if (v := _num(r.get("loss"))) is not None
    ]
    finite = [v for _, _, v in series if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return []
    start = statistics.median(finite[:window])
    out: list[LossPoint] = []
    recent: list[float] = []
    low: float | None = None
    low_step: int | None = None
    for i, step, v in series:
        if not math.isfinite(v):
            rising = bool(out) and out[-1].rising
            out.append(LossPoint(i, step, v, None, low, low_step, math.inf if rising else None,
                                 rising))  # fmt: skip
            continue
        recent = [*recent, v][-window:]
        smoothed = statistics.median(recent)
        ratio = smoothed / low if low is not None else None
        rising = (
            low is not None and smoothed >= rise * low and smoothed - low >= undo * (start - low)
        )
        out.append(LossPoint(i, step, v, smoothed, low, low_step, ratio, rising))
        if low is None or smoothed < low:
            low, low_step = smoothed, step
    return out
