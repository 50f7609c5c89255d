"""One rule per suggested number: the clip threshold and the learning-rate factor.

Every remedy that names a number takes it from :func:`suggest`, so a diagnosis
proposes one clip threshold and one learning-rate factor, whichever detectors
fired, and each is derived from the records the way docs/diagnosis.md says:

1. **The first bad record**: the earliest record that is non-finite (NaN/Inf in
   its loss, origin, or gradient norms), a blow-up (global gradient norm at least
   ``blowup`` times the median of the earlier ones; loss risen ``loss_rise``-fold,
   the divergence rule), a gradient explosion (fitted through depth beyond
   ``exploding_gain`` on a geometric profile, or through time), or an update
   spike (``||dw||/||w|| >= update_ratio_spike``). Numbers measured from that
   record on describe the failure, not the training that should be restored.
2. **Clip threshold**: the ``clip_percentile`` (90th) percentile of the global
   gradient norms (before any clipping) of the finite records before the first
   bad one, clamped to ``clip_bounds`` (1e-3..1e3) times their median. Without
   any such record: 1.0, the usual starting point. When the run already clips at
   a threshold no larger, no clip is suggested: clipping harder would only act
   as a smaller learning rate, which the lr factor says directly.
3. **Learning-rate factor**: the power of ten (at least 10x) that brings the
   largest per-layer update ratio to ``update_ratio_healthy`` (1e-2): the median
   ratio of the records before the first bad one when it is already above 1e-2
   (steps were too large before anything broke), else the first bad record's,
   else the first recorded ratio above 1e-2; bounded to ``lr_factor_bounds``
   (0.01..0.5). Without a measured ratio: 0.1, one decade.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import row_step
from gradmedic.diagnose.in_time import explodes, fit_series
from gradmedic.diagnose.profile import gain_series, sci
from gradmedic.diagnose.signals import (
    existing_clip,
    grad_norm,
    loss_points,
    nonfinite_row,
    ratio_points,
)

Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Suggestion:
    """The numbers of a diagnosis' remedies, with their derivation.

    Attributes:
        first_bad_step: Step of the first bad record (None: none found).
        first_bad_reason: What made it bad.
        baseline_steps: ``(first, last)`` step of the finite records before it
            whose norms the clip threshold comes from (None: none).
        baseline_norms: How many norms those were.
        clip_norm: The suggested global-norm clip threshold (None: the run
            already clips at least as tightly).
        clip_why: Its derivation in words.
        existing_clip: The threshold the run already clips at, if visible.
        lr_factor: The suggested learning-rate factor.
        lr_why: Its derivation in words.
        update_ratio: The update ratio the factor was sized from (None: none).
        lr: The learning rate(s) at the first bad record, when recorded.
    """

    first_bad_step: int | None
    first_bad_reason: str | None
    baseline_steps: tuple[int, int] | None
    baseline_norms: int
    clip_norm: float | None
    clip_why: str
    existing_clip: float | None
    lr_factor: float
    lr_why: str
    update_ratio: float | None
    lr: list[float] | None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (Diagnosis.suggested)."""
        return asdict(self)

    def new_lr(self) -> list[float] | None:
        """The learning rate(s) after the factor, when the current ones are known."""
        return [v * self.lr_factor for v in self.lr] if self.lr else None


def first_bad(rows: Rows, config: DiagnosisConfig) -> tuple[int, str] | None:
    """Row index and reason of the first bad record (see the module docstring)."""
    hits: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        if nonfinite_row(row):
            hits.append((i, "non-finite values"))
            break
    blowup = config.blowup
    earlier: list[float] = []
    for i, row in enumerate(rows):
        v = grad_norm(row)
        if v is None or not math.isfinite(v):
            continue
        if earlier and v >= blowup * statistics.median(earlier):
            hits.append((i, f"global gradient norm {sci(v)}, {blowup:g}x the median before it"))
            break
        earlier.append(v)
    rising = next((p for p in loss_points(rows, config) if p.rising), None)
    if rising is not None:
        hits.append((rising.index, f"loss risen {rising.ratio:.3g}x over its low"))
    limit, r2, step_gain = config.exploding_gain, config.geometric_r2, config.exploding_step_gain
    layers = config.context.get("layers")
    # as the exploding detector counts them: over its window, or one record far beyond
    severe = 10.0**config.severe_gain_decades
    crossed = [p for p in gain_series(rows, config.window, layers) if p.total_gain > limit]
    crossed += [p for p in gain_series(rows, 1, layers) if p.total_gain > severe]
    depth = min((p for p in crossed if p.r2 >= r2), key=lambda p: p.index, default=None)
    if depth is not None:
        hits.append((depth.index, f"gradient exploding through depth ({sci(depth.total_gain)}x)"))
    for points in fit_series(rows, config, 1).values():
        hit = next((p for p in points if any(explodes(f, limit, step_gain) for f in p.fits)), None)
        if hit is not None:
            hits.append((hit.index, "gradient exploding through time"))
    jump = next((p for p in ratio_points(rows) if p.value >= config.update_ratio_spike), None)
    if jump is not None:
        hits.append((jump.index, f"update ratio {jump.value:.3g} in layer {jump.layer!r}"))
    return min(hits, key=lambda h: h[0]) if hits else None


def lr_factor(
    ratio: float, healthy: float = 1e-2, bounds: tuple[float, float] = (0.01, 0.5)
) -> float:
    """The power of ten (at least 10x) bringing ``ratio`` to ``healthy``, within ``bounds``.

    Example:
        >>> lr_factor(0.5), lr_factor(0.05), lr_factor(1e18)
        (0.01, 0.1, 0.01)
    """
    low, high = bounds
    if not math.isfinite(ratio) or ratio <= 0:
        return low
    factor = min(0.1, 10.0 ** math.floor(math.log10(healthy / ratio) + 1e-9))
    return float(min(high, max(low, factor)))


def suggest(rows: Rows, config: DiagnosisConfig) -> Suggestion:
    """The clip threshold and learning-rate factor of this run (module docstring)."""
    bad = first_bad(rows, config)
    end = bad[0] if bad is not None else len(rows)
    bad_step = row_step(rows[end], end) if bad is not None else None
    before = rows[:end]
    # ---- clip threshold
    norms = [(row_step(r, i), v) for i, r in enumerate(before)
             if (v := grad_norm(r)) is not None and math.isfinite(v) and v > 0]  # fmt: skip
    have = existing_clip(rows)
    lo, hi = config.clip_bounds
    pct = config.clip_percentile
    if norms:
        values = np.array([v for _, v in norms])
        typical = float(np.median(values))
        raw = float(np.percentile(values, pct))
        clip = float(min(max(raw, lo * typical), hi * typical))
        when = "before the first bad record" if bad is not None else "in the run"
        why = (
            f"the {pct:g}th percentile of the {len(norms)} global gradient norms recorded "
            f"{when} (steps {norms[0][0]}-{norms[-1][0]}, median {sci(typical)})"
        )
        if clip != raw:
            why += f", clamped to [{lo:g}, {hi:g}] x median"
        baseline = (norms[0][0], norms[-1][0])
    else:
        clip, baseline = config.clip_fallback, None
        why = (
            "no finite gradient norm was recorded before the first bad record"
            + (f" (step {bad_step})" if bad_step is not None else "")
            + f"; {clip:g} is the usual starting point"
        )
    if have is not None and clip >= have * (1 - 1e-6):
        why = (
            f"the run already clips the global norm at {have:.3g}: clipping harder acts as a "
            "smaller lr"
        )
        clip_out: float | None = None
    else:
        clip_out = clip
    # ---- learning-rate factor
    healthy, bounds = config.update_ratio_healthy, config.lr_factor_bounds
    points = ratio_points(rows)
    pre = [p.value for p in points if p.index < end and math.isfinite(p.value)]
    at_bad = next((p for p in points if p.index == end and math.isfinite(p.value)), None)
    above = next((p for p in points if math.isfinite(p.value) and p.value > healthy), None)
    ratio: float | None = None
    if pre and statistics.median(pre) > healthy:
        ratio = statistics.median(pre)
        which = (
            f"the {len(pre)} records before the first bad one" if bad else f"all {len(pre)} records"
        )
        source = f"the median largest update ratio {ratio:.3g} of {which}"
    elif at_bad is not None and at_bad.value > healthy:
        ratio = at_bad.value
        source = f"the update ratio {ratio:.3g} at the first bad record (step {at_bad.step})"
    elif above is not None:
        ratio = above.value
        source = (
            f"the update ratio {ratio:.3g} at step {above.step} (the first above the "
            f"healthy {healthy:g})"
        )
    if ratio is not None:
        factor = lr_factor(ratio, healthy, bounds)
        lr_why = (
            f"brings {source} toward {healthy:g} (a power of ten, within "
            f"{bounds[0]:g}-{bounds[1]:g})"
        )
    else:
        factor = float(min(bounds[1], max(bounds[0], 0.1)))
        lr_why = (
            "no update ratio above the healthy range was recorded; one decade is the usual "
            "first step"
        )
    lr = lr_at(rows, min(end, len(rows) - 1)) if rows else None
    if lr is None:
        opt = config.context.get("optimizer")
        if isinstance(opt, Mapping) and isinstance(opt.get("lr"), list | tuple):
            lr = [float(v) for v in opt["lr"]]
    return Suggestion(
        first_bad_step=bad_step,
        first_bad_reason=bad[1] if bad is not None else None,
        baseline_steps=baseline,
        baseline_norms=len(norms),
        clip_norm=clip_out,
        clip_why=why,
        existing_clip=have,
        lr_factor=factor,
        lr_why=lr_why,
        update_ratio=ratio,
        lr=lr,
    )


def suggested(rows: Rows, config: DiagnosisConfig) -> Suggestion:
    """The diagnosis' suggestion.

    Computed once by ``diagnose_rows`` (``config.context["suggested"]``), else now.
    """
    found = config.context.get("suggested")
    if isinstance(found, Suggestion):
        return found
    return suggest(rows, config)


def lr_at(rows: Rows, index: int) -> list[float] | None:
    """The learning rates of the latest record at or before ``index`` that holds them."""
    for row in reversed(rows[: index + 1]):
        lr = row.get("lr")
        if isinstance(lr, list | tuple) and lr and all(isinstance(v, int | float) for v in lr):
            return [float(v) for v in lr]
        if isinstance(lr, int | float) and not isinstance(lr, bool):
            return [float(lr)]
    return None
