"""Shared helpers of the detectors: per-layer profiles and the fitted per-layer gain.

The delta ``delta_l = dL/dh_l`` obeys the chain rule
``delta_{l-1} = W_l^T diag(phi'(z_l)) delta_l``, so going back one layer
multiplies its norm by roughly the same factor ``g`` at every layer of a
homogeneous stack, and ``||delta_1|| ~ g^(L-1) ||delta_L||``. A straight-line
fit of ``log10 ||delta_l||`` against the layer index gives ``g`` robustly (one
odd layer, e.g. a narrow output layer, moves it little); ``g^(L-1)`` is the
total gain across the stack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Rows = Sequence[Mapping[str, Any]]


def recent(rows: Rows, key: str, window: int) -> list[Mapping[str, Any]]:
    """The last ``window`` rows holding a non-empty ``key``, oldest first."""
    found = [row for row in rows if row.get(key)]
    return found[-window:]


def positive(value: Any) -> bool:
    """Whether ``value`` is a finite number > 0 (usable on a log scale)."""
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def layer_profile(
    rows: Rows, key: str, window: int, layers: Sequence[str] | None = None
) -> dict[str, float]:
    """Geometric mean over the last ``window`` rows of each layer's ``key`` value.

    Values that are zero or non-finite are skipped (the non-finite and
    dead-unit detectors own them). Layers follow ``layers`` when given, else
    the key order of the latest row (input side first).
    """
    chosen = recent(rows, key, window)
    if not chosen:
        return {}
    order = list(layers) if layers else list(chosen[-1][key])
    out: dict[str, float] = {}
    for name in order:
        logs = [math.log(r[key][name]) for r in chosen if positive(r[key].get(name))]
        if logs:
            out[name] = math.exp(sum(logs) / len(logs))
    return out


@dataclass(frozen=True)
class GainFit:
    """A per-layer profile and the gain fitted to it.

    Attributes:
        source: The row key the profile came from (``delta_norm`` or ``grad_norm``).
        layers: Layers in the fit, input side first.
        values: Their values.
        per_layer_gain: Factor by which the norm changes per layer going back
            toward the input (``10**(-slope)`` of the fit of log10 values).
        total_gain: ``per_layer_gain ** (len(layers) - 1)``.
        end_ratio: ``values[0] / values[-1]`` as measured (input over output side).
        step: Step of the latest row used.
        r2: How much of the log-profile's variance the fitted line explains.
    """

    source: str
    layers: tuple[str, ...]
    values: tuple[float, ...]
    per_layer_gain: float
    total_gain: float
    end_ratio: float
    step: int | None
    r2: float = 1.0

    def relative(self) -> dict[str, float]:
        """Each layer's value over the output-side layer's value."""
        last = self.values[-1]
        return {n: v / last for n, v in zip(self.layers, self.values, strict=True)}


def fit_gain(rows: Rows, window: int, layers: Sequence[str] | None = None) -> GainFit | None:
    """Fit the per-layer gain of the delta profile (or the gradient profile without deltas).

    Args:
        rows: History rows.
        window: How many of the latest rows to average.
        layers: Layer order, input side first (default: the rows' key order).

    Returns:
        The fit, or None with fewer than two usable layers.
    """
    for source in ("delta_norm", "grad_norm"):
        prof = layer_profile(rows, source, window, layers)
        if len(prof) >= 2:
            break
    else:
        return None
    order = list(layers) if layers else list(recent(rows, source, 1)[-1][source])
    position = {n: i for i, n in enumerate(order)}
    names = [n for n in order if n in prof]
    x = np.array([position[n] for n in names], dtype=float)
    y = np.log10([prof[n] for n in names])
    slope, r2 = line_fit(x, y)
    per_layer = 10.0 ** (-slope)
    total = _pow10(-slope * float(x[-1] - x[0]))
    latest = recent(rows, source, 1)[-1]
    step = latest.get("step")
    return GainFit(
        source=source,
        layers=tuple(names),
        values=tuple(prof[n] for n in names),
        per_layer_gain=per_layer,
        total_gain=total,
        end_ratio=prof[names[0]] / prof[names[-1]],
        step=int(step) if step is not None else None,
        r2=r2,
    )


@dataclass(frozen=True)
class GainPoint:
    """The depth fit on the window of records ending at one record.

    Attributes:
        index: Row index of the record (in the rows given).
        step: Its step.
        per_layer_gain: ``10**(-slope)`` of the fit of the window's
            geometric-mean profile.
        total_gain: ``per_layer_gain ** (x_last - x_first)``.
        r2: Fraction of the log-profile's variance the straight line explains
            (1.0 for a flat profile): how geometric the profile is.
        layers: Number of layers in the fit.
    """

    index: int
    step: int | None
    per_layer_gain: float
    total_gain: float
    r2: float
    layers: int
    #: The input-side-most layer's value over the output-side-most one's (measured).
    end_ratio: float = 1.0


def profile_source(rows: Rows) -> str | None:
    """``delta_norm`` if any record has two usable deltas, else ``grad_norm`` (else None)."""
    for source in ("delta_norm", "grad_norm"):
        for row in rows:
            values = row.get(source)
            if values and sum(1 for v in values.values() if positive(v)) >= 2:
                return source
    return None


def gain_series(rows: Rows, window: int, layers: Sequence[str] | None = None) -> list[GainPoint]:
    """The depth fit at every record with a usable profile, each on its trailing window.

    Record ``k``'s point fits the geometric mean of the profiles of the last
    ``window`` usable records up to ``k`` (fewer at the start of the run), as
    :func:`fit_gain` does for the latest record. ``window=1`` fits each
    record alone.
    """
    source = profile_source(rows)
    if source is None:
        return []
    if layers:
        order = list(layers)
    else:
        order = list(recent(rows, source, 1)[-1][source])
    position = {n: i for i, n in enumerate(order)}
    usable: list[tuple[int, dict[int, float]]] = []
    for i, row in enumerate(rows):
        values = row.get(source) or {}
        logs = {
            position[n]: math.log10(v) for n, v in values.items() if n in position and positive(v)
        }
        if len(logs) >= 2:
            usable.append((i, logs))
    out: list[GainPoint] = []
    for k, (i, _) in enumerate(usable):
        chosen = usable[max(0, k - window + 1) : k + 1]
        sums: dict[int, list[float]] = {}
        for _, logs in chosen:
            for x, y in logs.items():
                sums.setdefault(x, []).append(y)
        xs = np.array(sorted(sums), dtype=float)
        ys = np.array([sum(sums[int(x)]) / len(sums[int(x)]) for x in xs])
        slope, r2 = line_fit(xs, ys)
        step = rows[i].get("step")
        out.append(
            GainPoint(
                index=i,
                step=int(step) if step is not None else i,
                per_layer_gain=10.0 ** (-slope),
                total_gain=_pow10(-slope * float(xs[-1] - xs[0])),
                r2=r2,
                layers=len(xs),
                end_ratio=_pow10(float(ys[0] - ys[-1])),
            )
        )
    return out


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` against ``x`` and the R^2 of the line (1.0 if ``y`` is flat)."""
    slope, intercept = np.polyfit(x, y, 1)
    total = float(np.sum((y - y.mean()) ** 2))
    if total <= 1e-24:
        return float(slope), 1.0
    resid = float(np.sum((y - (slope * x + intercept)) ** 2))
    return float(slope), max(0.0, 1.0 - resid / total)


def _pow10(exponent: float) -> float:
    try:
        return 10.0**exponent
    except OverflowError:
        return math.inf


def activation_kinds(layers: Sequence[str], context: Mapping[str, Any]) -> list[str]:
    """The activation class names following ``layers`` (those known from the context)."""
    acts = context.get("activations") or {}
    return [acts[n] for n in layers if acts.get(n)]


def dominant(kinds: Sequence[str]) -> str | None:
    """The most frequent entry of ``kinds`` (None when empty)."""
    if not kinds:
        return None
    return max(set(kinds), key=lambda k: (kinds.count(k), k))


def typical_weight_scale(layers: Sequence[str], context: Mapping[str, Any]) -> float | None:
    """Median ``std(W) * sqrt(fan_in)`` of ``layers`` from the context, if known."""
    scales = context.get("weight_scale") or {}
    vals = [scales[n] for n in layers if positive(scales.get(n))]
    return float(np.median(vals)) if vals else None


def sci(value: float) -> str:
    """A number in short scientific form for explanations (``7e-17``, ``0.14``)."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:.2g}"
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
