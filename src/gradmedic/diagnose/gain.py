"""The shared core of the vanishing and exploding detectors: a gain finding.

Both read the same evidence, the fitted per-layer gain of the backpropagated
delta (:mod:`gradmedic.diagnose.profile`), and differ only in direction and
remedies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import Point, episode, larger, row_step, smaller
from gradmedic.diagnose.profile import (
    activation_kinds,
    dominant,
    fit_gain,
    gain_series,
    positive,
    recent,
    sci,
    typical_weight_scale,
)
from gradmedic.diagnose.signals import nonfinite_row
from gradmedic.diagnose.units import dead_modules
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog

Rows = Sequence[Mapping[str, Any]]
RemedyRanker = Callable[[str | None, DiagnosisConfig], list[Remedy]]

_SIGMOID_LIKE = {"Sigmoid", "Hardsigmoid", "LogSigmoid"}
_TANH_LIKE = {"Tanh", "Hardtanh", "Softsign"}


def mechanism(kind: str | None, weight_scale: float | None) -> str:
    """The per-layer chain-rule factor in words: ``phi'`` bound times ``|w|``."""
    w = f" times |w| ~ {weight_scale:.2g}" if weight_scale else ""
    if kind in _SIGMOID_LIKE:
        return f"sigma' <= 1/4{w}"
    if kind in _TANH_LIKE:
        return f"{kind.lower()}' <= 1, smaller away from 0{w}"
    if kind is not None:
        size = f", with |w| ~ {weight_scale:.2g}" if weight_scale else ""
        return f"{kind}'s slope is 1 on about half the units: about |w| sqrt(1/2){size}"
    return f"the Jacobian diag(phi'(z)) W of each layer{w}"


def cut_layers(rows: Rows, config: DiagnosisConfig) -> tuple[list[str], str | None]:
    """Layers whose delta norm is 0 on the input side of a layer whose delta norm is not.

    No usable gradient reaches them: the chain-rule product underflowed, to exactly
    0 or below what the float32 norm resolves (entries near 1e-23). When
    dead units explain the zeros, they are the dead-unit detector's finding,
    not a vanishing one, and none are returned. Judged at the latest record.

    Returns:
        The cut-off layers and the output-side-most layer with a positive value.
    """
    for source in ("delta_norm", "grad_norm"):
        latest = recent(rows, source, FLUSH_RECORDS)
        if latest:
            break
    else:
        return [], None
    cut, last = _cut_in(latest[-1][source], config, [r[source] for r in latest[:-1]])
    if cut and dead_modules(rows, config.window, config.dead_fraction):
        return [], None
    return cut, last


def _cut_in(
    values: Mapping[str, Any],
    config: DiagnosisConfig,
    previous: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[str], str | None]:
    """Zero layers that form the whole input side of the profile (an underflowed product).

    Once ``delta_l`` is 0 every delta further back is 0 too (``delta_{l-1} = J^T
    delta_l``), so an underflow zeroes a prefix of the layers. Zeros between
    layers that do receive a gradient are no underflow: a zero-initialized
    parameter downstream (LoRA's B, the last layer of a zero-init residual
    branch) multiplies that branch's gradient by 0 by design, until its first
    update.

    A product underflows through ever smaller values: the input-side-most layer that
    still receives a gradient has at most :data:`UNDERFLOW_NEAR` of the largest one.
    A jump from a normal-sized gradient straight to 0 is one Jacobian that is exactly
    0 (a zero-initialized last layer, whose ``W^T delta`` is 0 until its first
    update; a layer of dead units), not an underflow, unless those layers compute in
    float16 (:func:`float16_flush`) and were 0 on the :data:`FLUSH_RECORDS` ``- 1``
    ``previous`` records too (oldest first).
    """
    order = [n for n in (config.context.get("layers") or values) if n in values]
    alive = [n for n in order if positive(values.get(n))]
    if not alive:
        return [], None
    before = order[: order.index(alive[-1])]
    zeros = [n for n in before if values.get(n) == 0.0]
    if zeros != before[: len(zeros)]:
        return [], alive[-1]
    if zeros and values[alive[0]] > UNDERFLOW_NEAR * max(values[n] for n in alive):
        persistent = len(previous) >= FLUSH_RECORDS - 1 and all(
            p.get(n) == 0.0 for p in previous[-(FLUSH_RECORDS - 1) :] for n in zeros
        )
        if not (persistent and float16_flush(zeros, config.context)):
            return [], alive[-1]
    return zeros, alive[-1]


def float16_flush(zeros: Sequence[str], context: Mapping[str, Any]) -> bool:
    """Whether the zero gradients are float16's: those layers output float16.

    float16's smallest positive value is 6e-8: a delta below it is 0, at once, with
    no decay through the layers before (the loss itself may be that small). A zero-
    initialized layer's ``W^T delta`` is 0 too, until its first updates make it large
    enough, so the caller asks for :data:`FLUSH_RECORDS` records running.
    """
    half = context.get("float16_layers") or {}
    return any(n in half for n in zeros)


#: The measured ratio of the two ends of the profile must cross ``threshold**END_SHARE`` too
#: (31x for 1e3): a chain's ends carry its fitted gain, while parallel branches fitted as
#: if chained (a mixture of experts: a rarely routed expert's delta is tiny) do not
#: (a healthy MoE fitted 1e5 with its input and head 6x apart).
END_SHARE = 0.5

#: Records running a float16 layer's gradient must be 0 to count as flushed (a zero-
#: initialized head under float16 cuts the layers before it for its first two steps).
FLUSH_RECORDS = 3

#: A gradient that underflows to 0 went through values this far below the largest one:
#: float16 flushes below 6e-8 (6e-5 in normal numbers), so with output-side gradients
#: down to ~1e-4 a half-precision underflow still shows this much decay first.
UNDERFLOW_NEAR = 1e-3


def _cut_points(rows: Rows, config: DiagnosisConfig) -> dict[int, list[str]]:
    """Row index -> layers cut off at that record (dead units explaining them excluded)."""
    out: dict[int, list[str]] = {}
    previous: dict[str, list[Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        for source in ("delta_norm", "grad_norm"):
            values = row.get(source)
            if values:
                earlier = previous.setdefault(source, [])
                cut, _ = _cut_in(values, config, earlier)
                earlier.append(values)
                del earlier[: -(FLUSH_RECORDS - 1)]  # the records the next one looks back on
                if cut and not dead_modules(rows[: i + 1], config.window, config.dead_fraction):
                    out[i] = cut
                break
    return out


def gain_finding(
    rows: Rows, config: DiagnosisConfig, problem: Problem, rank: RemedyRanker
) -> list[Finding]:
    """One vanishing/exploding finding for the run's episode of a crossed total gain.

    Every record with a usable depth profile is judged on the geometric-mean
    profile of the ``window`` records ending there: the problem holds when the
    fitted total gain crosses the threshold *and* the profile is geometric
    (R^2 >= ``geometric_r2``: one chain-rule factor per layer explains it). A
    vanishing finding is also made, with total gain 0, when some layers
    receive a gradient of norm 0 (:func:`cut_layers`). The evidence is the
    last record where it held; the severity comes from the most extreme
    record of the episode, taken alone. A record whose own profile crosses counts
    even where its window does not when it is beyond the severe threshold or is the
    last usable record before non-finite ones.
    """
    vanishing = problem is Problem.VANISHING
    layers = config.context.get("layers")
    limit = config.vanishing_gain if vanishing else config.exploding_gain

    def crosses(total: float) -> bool:
        return total < limit if vanishing else total > limit

    def through(fit: Any) -> bool:
        """The fitted gain crosses, and the two ends measure most of it (see ``END_SHARE``)."""
        end = limit**END_SHARE
        agrees = fit.end_ratio < end if vanishing else fit.end_ratio > end
        return crosses(fit.total_gain) and fit.r2 >= config.geometric_r2 and agrees

    windowed = gain_series(rows, config.window, layers)
    single = {p.index: p for p in gain_series(rows, 1, layers)}
    cuts = _cut_points(rows, config) if vanishing else {}
    points: list[Point] = []
    indices = sorted({p.index for p in windowed} | set(cuts))
    by_index = {p.index: p for p in windowed}
    severe = 10.0 ** (-config.severe_gain_decades if vanishing else config.severe_gain_decades)
    last_usable = max(single) if single else -1
    if not any(nonfinite_row(r) for r in rows[last_usable + 1 :]):
        last_usable = -1  # the run simply ended: the window decides
    for i in indices:
        w = by_index.get(i)
        crossed = w is not None and through(w)
        one = single.get(i)
        if not crossed and one is not None and through(one):
            # A record alone counts when it is beyond the severe threshold (no healthy
            # batch measures six decades from 1) or when no later record can outvote it
            # because the run turned non-finite right after (the explosion before a NaN).
            crossed = (one.total_gain < severe if vanishing else one.total_gain > severe) or (
                i == last_usable
            )
        value = 0.0 if i in cuts else (one.total_gain if one is not None else math.nan)
        points.append(Point(i, row_step(rows[i], i), crossed or i in cuts, value))
    ep = episode(points, smaller if vanishing else larger, "total_gain")
    if ep is None:
        return []
    end = max(p.index for p in points if p.bad)
    upto = rows[: end + 1]
    fit = fit_gain(upto, config.window, layers)
    cut = cuts.get(end, [])
    last = _cut_in(_latest_values(upto), config)[1] if cut else None

    def crossed_by(f: Any) -> bool:
        return f is not None and through(f)

    if not crossed_by(fit) and not cut:
        fit = fit_gain(upto[-1:], 1, layers)  # the record that counted alone
    crossed = crossed_by(fit)
    sentences: list[str] = []
    evidence: dict[str, Any] = {"threshold": limit}
    involved: list[str] = list(cut)
    kind = None
    if fit is not None:
        relative = fit.relative()
        beyond = [n for n, r in relative.items() if (r < limit if vanishing else r > limit)]
        if crossed or not cut:
            involved += [n for n in (beyond or [fit.layers[0]]) if n not in involved]
        inner = list(fit.layers[:-1])  # the last layer's activation is not on the path
        kinds = activation_kinds(inner, config.context)
        kind = dominant(kinds)
        scale = typical_weight_scale(inner, config.context)
        what = "gradient (dL/d output)" if fit.source == "delta_norm" else "weight gradient"
        kind_word = f"{kind} " if kind and kinds.count(kind) * 2 > len(inner) else ""
    jump = one_jump(fit) if fit is not None and (crossed or not cut) else None
    if jump is not None and fit is not None:
        below, above, factor = jump
        sentences.append(
            f"The {what} changes by {sci(factor)} in one place, going back from layer "
            f"{above!r} to layer {below!r}, and by little across the other "
            f"{len(fit.layers) - 2} steps of the profile: layer {fit.layers[0]!r} receives "
            f"{sci(fit.end_ratio)} {'of' if vanishing else 'times'} the {what} of layer "
            f"{fit.layers[-1]!r}. One Jacobian does it, not a product through depth: whatever "
            f"runs between {below!r} and {above!r} (a constant scale, a near-zero weight or "
            "gate, an operation in forward) multiplies the gradient by that factor, and a "
            "per-layer init does not change it."
        )
        evidence.update(jump_between=[below, above], jump_factor=factor)
    elif fit is not None and (crossed or not cut):
        sentences.append(
            f"Going back from layer {fit.layers[-1]!r} toward the input, each of the "
            f"{len(fit.layers) - 1} {kind_word}layers multiplies the {what} by about "
            f"{fit.per_layer_gain:.2g} ({mechanism(kind, scale)}): layer {fit.layers[0]!r} "
            f"receives {sci(fit.end_ratio)} {'of' if vanishing else 'times'} the {what} of "
            f"layer {fit.layers[-1]!r} (fitted over the stack: {sci(fit.total_gain)}, "
            f"R^2 {fit.r2:.2f})."
        )
    if fit is not None:
        evidence.update(
            source=fit.source,
            input_output_ratio=fit.end_ratio,
            per_layer_gain=fit.per_layer_gain,
            total_gain=fit.total_gain,
            fit_r2=fit.r2,
            relative=relative,
            activation=kind,
            weight_scale=scale,
        )
    half = bool(cut) and float16_flush(cut, config.context)
    scaled = next((r["loss_scale"] for r in reversed(upto) if "loss_scale" in r), None)
    if cut:
        layers_text = (
            f"Layers {', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''} ({len(cut)} in all)"
        )
        if half and scaled is not None:
            sentences.append(
                f"{layers_text} receive a gradient of exactly 0 while layer {last!r} does not: "
                "they compute in float16 (autocast), whose smallest positive value is 6e-8, "
                f"and even with the loss scaled by {scaled:g} (GradScaler) the gradient "
                "flowing back to them is smaller, so it flushed to 0. A larger scale "
                "(GradScaler(init_scale=...), growth_factor) or bfloat16 for these layers "
                "keeps it."
            )
        elif half:
            sentences.append(
                f"{layers_text} receive a gradient of exactly 0 while layer {last!r} does not: "
                "they compute in float16 (autocast), whose smallest positive value is 6e-8, "
                "and the gradient flowing back to them is smaller, so it flushed to 0. "
                "Nothing reaches them until the loss is scaled."
            )
        else:
            sentences.append(
                f"{layers_text} receive a gradient of norm 0 while layer {last!r} does not: the "
                "chain-rule product underflowed (to exactly 0, or to entries too small for a "
                "float32 sum of squares, about 1e-23)."
            )
        evidence.update(total_gain=0.0, zero_gradient_layers=cut, float16=half)
    peak = ep.peak_value if ep.peak_value is not None and not math.isnan(ep.peak_value) else None
    if peak is None:
        peak = evidence.get("total_gain", 1.0)
    evidence.update(peak_total_gain=peak, peak_step=ep.peak)
    decades = config.severe_gain_decades
    severe = peak < 10**-decades if vanishing else peak > 10**decades
    step = upto[-1].get("step")
    return [
        Finding(
            problem=problem,
            severity=Severity.CRITICAL if severe else Severity.WARNING,
            layers=involved,
            evidence=evidence,
            explanation=" ".join(sentences),
            remedies=_remedies(rows, config, rank(kind, config), half, jump),
            step=int(step) if step is not None else None,
            episode=ep,
        )
    ]


def one_jump(fit: Any) -> tuple[str, str, float] | None:
    """``(layer, next layer, factor)`` when one step of the profile makes most of its gain.

    A chain through depth shrinks or grows a little at every layer; a profile where one
    adjacent pair differs by at least :data:`JUMP_DECADES` and carries at least
    :data:`JUMP_SHARE` of the end-to-end change in decades is one Jacobian's doing.
    """
    values = list(fit.values)
    if len(values) < 3 or not all(v > 0 for v in values):
        return None
    logs = [math.log10(v) for v in values]
    total = logs[0] - logs[-1]
    steps = [logs[k] - logs[k + 1] for k in range(len(logs) - 1)]
    k = max(range(len(steps)), key=lambda j: abs(steps[j]))
    big = steps[k]
    if abs(big) < JUMP_DECADES or big * total <= 0 or abs(big) < JUMP_SHARE * abs(total):
        return None
    return fit.layers[k], fit.layers[k + 1], 10.0**big


#: One adjacent step of a depth profile this many decades or more ...
JUMP_DECADES = 2.0
#: ... making at least this share of the end-to-end change is one Jacobian, not a chain.
JUMP_SHARE = 0.8


def _remedies(
    rows: Rows,
    config: DiagnosisConfig,
    ranked: list[Remedy],
    half: bool,
    jump: tuple[str, str, float] | None,
) -> list[Remedy]:
    """The ranked cures; loss scaling first for float16; no re-init for one layer's factor.

    A re-initialization changes neither a float16 flush nor one operation's factor.
    """
    if half:
        ranked = _precision_first(rows, config, ranked)
    if half or jump is not None:
        return [r for r in ranked if catalog.kind_of(r).name != "init_scheme"]
    return ranked


def _precision_first(rows: Rows, config: DiagnosisConfig, ranked: list[Remedy]) -> list[Remedy]:
    """Loss scaling ahead of the ranked cures, unless a GradScaler already scales the loss."""
    if any("loss_scale" in r for r in rows):
        return ranked
    devices = set((config.context.get("float16_layers") or {}).values())
    device = "cuda" if "cuda" in devices or not devices else sorted(devices)[0]
    scaling = catalog.loss_scaling(
        "multiplies every gradient by up to 2^16 before the backward pass and divides them "
        "back before the step, so float16 keeps them",
        device=device,
    )
    return [scaling, *ranked]


def _latest_values(rows: Rows) -> Mapping[str, Any]:
    for source in ("delta_norm", "grad_norm"):
        latest = recent(rows, source, 1)
        if latest:
            return latest[-1][source]
    return {}
