"""The shared core of the vanishing and exploding detectors: a gain finding.

Both read the same evidence, the fitted per-layer gain of the backpropagated
delta (:mod:`gradmedic.diagnose.profile`), and differ only in direction and
remedies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.profile import (
    activation_kinds,
    dominant,
    fit_gain,
    positive,
    recent,
    sci,
    typical_weight_scale,
)
from gradmedic.diagnose.units import dead_modules
from gradmedic.findings import Finding, Problem, Remedy, Severity

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
    """Layers whose delta is exactly 0 on the input side of a layer whose delta is not.

    No gradient reaches them at all: the chain-rule product underflowed. When
    dead units explain the zeros, they are the dead-unit detector's finding,
    not a vanishing one, and none are returned.

    Returns:
        The cut-off layers and the output-side-most layer with a positive value.
    """
    for source in ("delta_norm", "grad_norm"):
        latest = recent(rows, source, 1)
        if latest:
            break
    else:
        return [], None
    values = latest[-1][source]
    order = list(config.context.get("layers") or values)
    alive = [n for n in order if positive(values.get(n))]
    if not alive:
        return [], None
    zeros = [n for n in order[: order.index(alive[-1])] if values.get(n) == 0.0]
    if zeros and dead_modules(rows, config.window, config.dead_fraction):
        return [], None
    return zeros, alive[-1]


def gain_finding(
    rows: Rows, config: DiagnosisConfig, problem: Problem, rank: RemedyRanker
) -> list[Finding]:
    """One vanishing/exploding finding when the fitted total gain crosses the threshold.

    A vanishing finding is also made, with total gain 0, when some layers
    receive exactly zero gradient (:func:`cut_layers`).
    """
    vanishing = problem is Problem.VANISHING
    fit = fit_gain(rows, config.window, config.context.get("layers"))
    cut, last = cut_layers(rows, config) if vanishing else ([], None)
    limit = config.vanishing_gain if vanishing else config.exploding_gain
    crossed = fit is not None and (fit.total_gain < limit if vanishing else fit.total_gain > limit)
    if not crossed and not cut:
        return []
    sentences: list[str] = []
    evidence: dict[str, Any] = {"threshold": limit}
    involved: list[str] = list(cut)
    kind = None
    if fit is not None:
        relative = fit.relative()
        beyond = [n for n, r in relative.items() if (r < limit if vanishing else r > limit)]
        if crossed:
            involved += [n for n in (beyond or [fit.layers[0]]) if n not in involved]
        inner = list(fit.layers[:-1])  # the last layer's activation is not on the path
        kinds = activation_kinds(inner, config.context)
        kind = dominant(kinds)
        scale = typical_weight_scale(inner, config.context)
        what = "gradient (dL/d output)" if fit.source == "delta_norm" else "weight gradient"
        kind_word = f"{kind} " if kind and kinds.count(kind) * 2 > len(inner) else ""
        sentences.append(
            f"Going back from layer {fit.layers[-1]!r} toward the input, each of the "
            f"{len(fit.layers) - 1} {kind_word}layers multiplies the {what} by about "
            f"{fit.per_layer_gain:.2g} ({mechanism(kind, scale)}): layer {fit.layers[0]!r} "
            f"receives {sci(fit.end_ratio)} {'of' if vanishing else 'times'} the {what} of "
            f"layer {fit.layers[-1]!r} (fitted over the stack: {sci(fit.total_gain)})."
        )
        evidence.update(
            source=fit.source,
            input_output_ratio=fit.end_ratio,
            per_layer_gain=fit.per_layer_gain,
            total_gain=fit.total_gain,
            relative=relative,
            activation=kind,
            weight_scale=scale,
        )
    if cut:
        sentences.append(
            f"Layers {', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''} ({len(cut)} in all) "
            f"receive exactly zero gradient while layer {last!r} does not: the chain-rule "
            "product underflowed to 0."
        )
        evidence.update(total_gain=0.0, zero_gradient_layers=cut)
    total = evidence["total_gain"]
    decades = config.severe_gain_decades
    severe = total < 10**-decades if vanishing else total > 10**decades
    return [
        Finding(
            problem=problem,
            severity=Severity.CRITICAL if severe else Severity.WARNING,
            layers=involved,
            evidence=evidence,
            explanation=" ".join(sentences),
            remedies=rank(kind, config),
            step=_step(rows),
        )
    ]


def _step(rows: Rows) -> int | None:
    for source in ("delta_norm", "grad_norm"):
        latest = recent(rows, source, 1)
        if latest and latest[-1].get("step") is not None:
            return int(latest[-1]["step"])
    return None
