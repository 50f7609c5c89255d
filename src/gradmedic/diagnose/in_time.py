"""Shared helpers of the in-time detectors: the gradient-over-time profile and its fit.

Backpropagation through time gives ``dL/dh_{t-1} = J_t^T dL/dh_t`` with the
per-step Jacobian ``J_t = diag(phi'(a_t)) W_hh`` for a plain RNN, so going back one
step multiplies ``||dL/dh_t||`` by roughly the same factor ``g`` and the gradient
``k`` steps back is ``~ g^k`` times the last step's (Pascanu et al. 2013, "On the
difficulty of training recurrent neural networks"). ``||J_t|| <= gamma *
sigma_max(W_hh)`` with ``gamma = max |phi'|`` (1 for tanh and ReLU, 1/4 for
sigmoid), so ``sigma_max < 1/gamma`` suffices for vanishing, and
``sigma_max > 1/gamma`` (spectral radius ``> 1`` for a linear recurrence) is
necessary for explosion.

The profiles come from :class:`~gradmedic.probes.recurrent.RecurrentProbe`
(record key ``"recurrent"``). A fit of ``log ||dL/dh||`` against the number of
steps back from the last processed step gives ``g`` (``per_step_gain``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.profile import Rows, positive

GAMMA = {"tanh": 1.0, "relu": 1.0, "sigmoid": 0.25}
"""Largest slope of each activation: the ``gamma`` of Pascanu et al.'s bound."""

GATE_KEYS = ("forget_gate", "update_gate")


@dataclass(frozen=True)
class TimeFit:
    """The fitted gradient-over-time profile of one module (one layer/direction).

    Attributes:
        module: Qualified module name.
        stream: Layer/direction (``"l0"``, ``"l1_reverse"``, ...).
        kind: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        source: Record key of the profile (``"dh_norm"`` or ``"dh_norm_last"``).
        profile: ``||dL/dh_t||`` indexed by time step ``t`` (input order).
        per_step_gain: Geometric-mean factor of ``||dL/dh||`` per step going back in
            time: ``exp(slope)`` of the least-squares fit of ``log ||dL/dh||``
            against steps back. < 1 vanishing, > 1 exploding.
        total_gain: ``per_step_gain ** (seq_len - 1)``: the fitted ratio of the
            first processed step's gradient to the last's.
        end_ratio: The same ratio as measured (inf when the last is 0).
        horizon: Steps back from the last processed step until ``||dL/dh||``
            first falls below ``vanish_ratio`` times its last-step value (None if never).
        seq_len: Number of time steps.
        sigma_max: Largest singular value of the (candidate block of) ``W_hh``.
        spectral_radius: Its spectral radius.
        nonfinite: Whether the profile holds inf/NaN.
        gates: Gate statistics averaged over time (``forget_gate_mean`` ...).
        extra: Other per-step profiles of the stream (``dc_norm``, gate profiles).
        step: Step of the latest row used.
        whole_fades: For a profile of the last step's gradient (``dh_norm_last``),
            whether the whole loss's ``||dL/dh_t||`` (``dh_norm``) fades too: False
            when a loss at every step (a language model) feeds every step directly;
            None for a ``dh_norm`` profile.
    """

    module: str
    stream: str
    kind: str
    nonlinearity: str
    source: str
    profile: tuple[float, ...]
    per_step_gain: float
    total_gain: float
    end_ratio: float
    horizon: int | None
    seq_len: int
    sigma_max: float | None
    spectral_radius: float | None
    nonfinite: bool
    gates: dict[str, float] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)
    step: int | None = None
    whole_fades: bool | None = None

    @property
    def gamma(self) -> float | None:
        """``max |phi'|`` of a plain RNN's activation (None for gated cells)."""
        return GAMMA.get(self.nonlinearity) if self.kind == "rnn" else None

    def evidence(self, streams: Mapping[str, float]) -> dict[str, Any]:
        """The finding evidence: every number here is re-derivable from the record."""
        out: dict[str, Any] = {
            "per_step_gain": self.per_step_gain,
            "total_gain": self.total_gain,
            "end_ratio": self.end_ratio,
            "horizon": self.horizon,
            "seq_len": self.seq_len,
            "sigma_max": self.sigma_max,
            "spectral_radius": self.spectral_radius,
            "gamma": self.gamma,
            "kind": self.kind,
            "nonlinearity": self.nonlinearity,
            "stream": self.stream,
            "profile_source": self.source,
            "profile": list(self.profile),
            "whole_loss_fades": self.whole_fades,
            "streams": dict(streams),
            **self.gates,
            **self.extra,
        }
        return out


MIN_STEPS = 4
"""Fewest time steps whose fitted per-step gain is judged on its own."""


def explodes(fit: TimeFit, limit: float, step_gain: float) -> bool:
    """Whether the profile grows beyond ``limit`` within the sequence (or overflowed).

    Also when it grows at least ``step_gain`` per step over a profile of
    :data:`MIN_STEPS` or more steps: the per-step factor belongs to ``W_hh``, not
    to the sequence length, so a short sequence only hides it (at 2x per step
    the gradient passes 1e3 in 10 steps).
    """
    if fit.nonfinite and any(v == math.inf for v in fit.profile):
        return True
    if fit.per_step_gain >= step_gain and fit.seq_len >= MIN_STEPS:
        return True
    return fit.per_step_gain > 1 and (fit.total_gain > limit or fit.end_ratio > limit)


def vanishes(fit: TimeFit, limit: float) -> bool:
    """Whether the profile decays below ``limit`` within the sequence."""
    return fit.per_step_gain < 1 and (fit.total_gain < limit or fit.horizon is not None)


def processing_order(profile: Sequence[float], stream: str) -> list[float]:
    """The profile from the last processed step backwards (``t = T-1, ..., 0`` forward).

    Args:
        profile: Values indexed by time step.
        stream: Stream name; a ``"_reverse"`` stream processes ``t = T-1`` first.
    """
    return list(profile) if stream.endswith("_reverse") else list(reversed(profile))


def log_gain(back: Sequence[float]) -> float | None:
    """``exp`` of the least-squares slope of ``log v_k`` against ``k`` (steps back).

    Zero and non-finite values are left out (they carry no slope information:
    underflow or overflow). None with fewer than two usable values.

    Example:
        >>> round(log_gain([1.0, 0.5, 0.25, 0.125]), 6)
        0.5
    """
    pts = [(k, math.log(v)) for k, v in enumerate(back) if positive(v)]
    if len(pts) < 2:
        return None
    k, y = np.array(pts).T
    return float(math.exp(np.polyfit(k, y, 1)[0]))


def cut_in_time(back: Sequence[float]) -> bool:
    """Whether the gradient reaches the last step and is exactly 0 at every earlier one.

    A saturated tanh (``tanh'`` is 0 in float32 beyond ``|a| > 9``) or a recurrent product
    that underflowed passes nothing back: no slope to fit, a total gain of 0.

    Example:
        >>> cut_in_time([0.04, 0.0, 0.0]), cut_in_time([0.04, 0.01, 0.0])
        (True, False)
    """
    return (
        len(back) > 1
        and positive(back[0])
        and all(isinstance(v, int | float) and v == 0.0 for v in back[1:])
    )


def horizon(back: Sequence[float], ratio: float) -> int | None:
    """Steps back until ``v_k < ratio * v_0`` (None if never or ``v_0`` unusable).

    Example:
        >>> horizon([1.0, 0.1, 0.01, 1e-4], 1e-3)
        3
    """
    if not back or not positive(back[0]):
        return None
    limit = ratio * back[0]
    for k, v in enumerate(back):
        if isinstance(v, int | float) and v < limit:
            return k
    return None


def fit_stream(
    module: str,
    stream: str,
    entries: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
    vanish_ratio: float,
    step: int | None,
) -> TimeFit | None:
    """Fit one stream's profile, averaged geometrically over ``entries``.

    Args:
        module: Module name.
        stream: Stream name.
        entries: The stream's per-row dicts, oldest first, all of one ``seq_len``.
        info: The module's latest record entry (kind, nonlinearity, ...).
        vanish_ratio: Ratio defining the horizon.
        step: Step of the latest row.
    """
    source = "dh_norm_last" if all(e.get("dh_norm_last") for e in entries) else "dh_norm"
    profile = _geomean([e[source] for e in entries])
    if len(profile) < 2:
        return None
    back = processing_order(profile, stream)
    gain = log_gain(back)
    if gain is None and cut_in_time(back):
        gain = 0.0  # nothing passes back beyond the first zero: the product is exactly 0
    if gain is None:
        return None
    latest = entries[-1]
    steps = len(profile)
    whole_fades = None
    if source == "dh_norm_last" and all(e.get("dh_norm") for e in entries):
        whole = processing_order(_geomean([e["dh_norm"] for e in entries]), stream)
        whole_gain = log_gain(whole)
        whole_fades = horizon(whole, vanish_ratio) is not None or (
            whole_gain is not None and _power(whole_gain, steps - 1) < vanish_ratio
        )
    extra = {}
    dc_key = "dc_norm_last" if source == "dh_norm_last" else "dc_norm"
    if all(e.get(dc_key) for e in entries):
        extra["dc_norm"] = _geomean([e[dc_key] for e in entries])
    gates = {}
    for gate in GATE_KEYS:
        for stat in ("mean", "std"):
            values = latest.get(f"{gate}_{stat}")
            if values:
                gates[f"{gate}_{stat}"] = float(np.mean(values))
                extra[f"{gate}_{stat}_profile"] = list(values)
    return TimeFit(
        module=module,
        stream=stream,
        kind=str(info.get("kind", "rnn")),
        nonlinearity=str(info.get("nonlinearity", "tanh")),
        source=source,
        profile=tuple(profile),
        per_step_gain=gain,
        total_gain=_power(gain, steps - 1),
        end_ratio=_ratio(back[-1], back[0]),
        horizon=horizon(back, vanish_ratio),
        seq_len=steps,
        sigma_max=_num(latest.get("sigma_max")),
        spectral_radius=_num(latest.get("spectral_radius")),
        nonfinite=any(not math.isfinite(v) for v in back if isinstance(v, int | float)),
        gates=gates,
        extra=extra,
        step=step,
        whole_fades=whole_fades,
    )


@dataclass(frozen=True)
class TimePoint:
    """The fits of one recurrent module at one record (on its trailing window)."""

    index: int
    step: int | None
    fits: tuple[TimeFit, ...]


NO_RECURRENT = (
    "no `recurrent` key: gradient over time not checked (no nn.RNN/LSTM/GRU ran with "
    "gradients outside a torch.compile graph, or watch(..., recurrent=False))"
)
"""Why the in-time detectors did not run."""


def module_series(
    rows: Rows, config: DiagnosisConfig
) -> list[tuple[str, list[TimePoint], dict[int, TimePoint]]]:
    """Per recurrent module: its fits at each record, and each record's own, by row index.

    The first fits use the trailing ``config.window`` records; the second that record alone.
    """
    single = fit_series(rows, config, 1)
    return [
        (module, series, {p.index: p for p in single.get(module, [])})
        for module, series in fit_series(rows, config).items()
    ]


def fit_series(
    rows: Rows, config: DiagnosisConfig, window: int | None = None
) -> dict[str, list[TimePoint]]:
    """For every recurrent module, its stream fits at every record that holds it.

    Record ``k``'s fits use the last ``window`` usable entries up to ``k`` of
    the same sequence length as record ``k``'s (lengths can vary between
    batches); ``window=1`` fits each record alone. Entries holding NaN are the
    non-finite detector's and are skipped (inf, an overflow, stays).
    """
    if window is None:
        window = config.window
    vanish_ratio = config.vanishing_gain
    seen: dict[str, list[Mapping[str, Any]]] = {}
    out: dict[str, list[TimePoint]] = {}
    for i, row in enumerate(rows):
        for module, info in (row.get("recurrent") or {}).items():
            if not isinstance(info, Mapping) or _has_nan(info):
                continue
            history = seen.setdefault(module, [])
            history.append(info)
            seq_len = info.get("seq_len")
            same = [e for e in history if e.get("seq_len") == seq_len][-window:]
            streams = info.get("streams") or {f"l{int(info.get('num_layers', 1)) - 1}": info}
            step = row.get("step")
            fits = []
            for stream in streams:
                entries = [e.get("streams", {}).get(stream, e) for e in same]
                fit = fit_stream(module, stream, entries, info, vanish_ratio, step)
                if fit is not None:
                    fits.append(fit)
            if fits:
                point = TimePoint(i, int(step) if step is not None else i, tuple(fits))
                out.setdefault(module, []).append(point)
    return out


def _has_nan(entry: Mapping[str, Any]) -> bool:
    values = entry.get("dh_norm") or []
    return any(not isinstance(v, int | float) or math.isnan(v) for v in values)


def time_profiles(rows: Rows) -> dict[str, list[float]]:
    """``{module: dh_norm}`` of the latest record of each recurrent module.

    The list is indexed by time step (the last layer's forward direction): this is
    what ``Diagnosis.context["time_profile"]`` holds for the terminal and HTML views.
    """
    out: dict[str, list[float]] = {}
    for row in rows:
        for module, info in (row.get("recurrent") or {}).items():
            if info.get("dh_norm"):
                out[module] = list(info["dh_norm"])
    return out


def _geomean(profiles: Sequence[Sequence[float]]) -> list[float]:
    if len(profiles) == 1:
        return [float(v) for v in profiles[0]]
    arr = np.asarray(profiles, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(v) for v in np.exp(np.mean(np.log(arr), axis=0))]


def _power(gain: float, n: int) -> float:
    try:
        return gain**n
    except OverflowError:
        return math.inf


def _ratio(a: float, b: float) -> float:
    if b == 0 or not math.isfinite(b):
        return math.inf if a > 0 else math.nan
    return a / b


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
