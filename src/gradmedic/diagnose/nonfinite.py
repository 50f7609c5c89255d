"""Non-finite values: the first module whose output, delta or gradient holds NaN/Inf.

The monitor records ``nonfinite_origin = {layer, where, step}``: the first
layer (with parameters) in forward order whose output is non-finite, else the
first in backward order whose delta is, else the first gradient. A NaN made
by a parameterless module (``log`` of a negative, ``0/0``) shows up at the
next layer with parameters; on the monitor's first recorded step (``check()``'s
only one) its forward tracer names that module exactly (the record's ``nonfinite_module``),
otherwise the modules run in between, from the context's ``forward_order``, are
named as the suspects.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import Point, episode, larger, row_step
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import lower_lr, setup_of
from gradmedic.diagnose.signals import nonfinite_row
from gradmedic.diagnose.suggest import suggested
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog

_WHERE: dict[str | None, str] = {
    "forward": "the forward output",
    "backward": "the gradient flowing back into the output (dL/d output)",
    "loss": "the gradient of the loss reaching the output",
    "gradient": "the parameters' gradient",
}


def suspects(origin: str, context: Mapping[str, Any], exact: str | None = None) -> list[str]:
    """Parameterless modules run between the previous layer and ``origin`` (forward order).

    ``exact``: the module the forward tracer saw output the first NaN/Inf, when it
    traced that step; then it alone is named (none when it is ``origin`` itself).
    """
    if exact:
        return [exact] if exact != origin else []
    order = list(context.get("forward_order") or [])
    layers = set(context.get("layers") or [])
    if origin not in order or not layers:
        return []
    containers = {name.rsplit(".", k)[0] for name in layers for k in range(1, name.count(".") + 1)}
    i = order.index(origin)
    between: list[str] = []
    for name in reversed(order[:i]):
        if name in layers:
            break
        if name and name not in containers:  # a block holding layers finishes after them
            between.append(name)
    return list(reversed(between))


def _unmeasured_before(
    layer: str | None, row: Mapping[str, Any], context: Mapping[str, Any]
) -> list[str]:
    """Layers run before ``layer`` whose output this record did not measure (rotation)."""
    layers = list(context.get("layers") or [])
    outputs = row.get("output_max") or {}
    if layer is None or layer not in layers or not outputs:
        return []
    return [n for n in layers[: layers.index(layer)] if n not in outputs]


def after(layer: str | None, context: Mapping[str, Any]) -> list[str]:
    """Parameterless modules run after the last layer ``layer`` (forward order): its head.

    The containers holding ``layer`` (they finish after it) are not among them.
    """
    order = list(context.get("forward_order") or [])
    layers = set(context.get("layers") or [])
    if layer is None or layer not in order:
        return []
    tail = [n for n in order[order.index(layer) + 1 :] if n and not layer.startswith(n + ".")]
    return [] if any(n in layers for n in tail) else tail


#: A last layer's output above this when the loss turns non-finite: the loss overflowed
#: on outputs grown by too large steps (a square of 1e19 overflows float32).
HUGE_OUTPUT = 1e15


def _loss_text(
    row: Mapping[str, Any], step: Any, layer: str | None, named: list[str], peak: float
) -> str:
    """Why a NaN/Inf made by the loss (not by any layer) is the loss's, and its fix."""
    loss = row.get("loss")
    became = (
        f" (the loss was {loss})" if isinstance(loss, float) and not math.isfinite(loss) else ""
    )
    head = f" or in {', '.join(repr(n) for n in named)} after it" if named else ""
    text = (
        f"At step {step}, the gradient of the loss reaching the output of the last layer "
        f"{layer!r} is the first NaN/Inf, while every layer's output was finite{became}: "
        f"it was made in the loss computation{head}, not in any layer."
    )
    if peak > HUGE_OUTPUT:
        return text + (
            f" Layer {layer!r} output values as large as {peak:.2g}: the loss overflowed on "
            "them; the weights grew by too large steps."
        )
    return text + (
        " The usual cause is a log of 0 (or a division by 0) in a hand-written loss, e.g. "
        "log(sigmoid(x)) once the sigmoid rounds to 0 or 1: compute the loss from the logits "
        "(torch.nn.functional.binary_cross_entropy_with_logits, cross_entropy, "
        "log_softmax), or clamp the argument of the log (p.clamp_min(1e-7))."
    )


#: Elementwise activations whose output is finite wherever their input is.
_FINITE_SAFE = {
    "ReLU", "LeakyReLU", "PReLU", "ReLU6", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
    "Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Hardswish", "Softsign", "Softplus",
    "Identity", "Dropout",
}  # fmt: skip


def _finite_input(
    origin: str, between: list[str], row: Mapping[str, Any], context: Mapping[str, Any]
) -> bool:
    """Whether the record shows the input of ``origin`` finite (so ``between`` made nothing).

    Either every module run in between was measured with a finite output, or the one
    module in between is the finite-preserving activation after a layer whose output
    was measured finite.
    """
    outputs = row.get("output_max") or {}
    if all(math.isfinite(outputs.get(n, math.nan)) for n in between):
        return True
    layers = list(context.get("layers") or [])
    if origin not in layers or layers.index(origin) == 0 or len(between) != 1:
        return False
    previous = layers[layers.index(origin) - 1]
    kind = (context.get("activations") or {}).get(previous)
    return kind in _FINITE_SAFE and math.isfinite(outputs.get(previous, math.nan))


def _first_origin(rows: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Any] | None:
    for row in rows:
        origin = row.get("nonfinite_origin")
        if origin:
            return origin, row
        loss = row.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            return {"layer": None, "where": "loss", "step": row.get("step")}, row
    return None


@register(
    Problem.NONFINITE,
    needs=("nonfinite_origin", "loss", "global_grad_norm", "grad_norm"),
    why="no gradient norm, loss or `nonfinite_origin` recorded",
)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """A critical finding at the first recorded non-finite origin."""
    found = _first_origin(rows)
    if found is None:
        return []
    origin, row = found
    layer, where, step = origin.get("layer"), origin.get("where"), origin.get("step")
    step = step if step is not None else row.get("step")
    exact = row.get("nonfinite_module")
    overflow = ""
    unmeasured = _unmeasured_before(layer, row, config.context) if where == "forward" else []
    named = suspects(layer, config.context, exact) if layer and where == "forward" else []
    if unmeasured and not exact:
        named = []  # what ran between is unknown: an unmeasured layer may have made it
    if named and layer and not exact and _finite_input(layer, named, row, config.context):
        named = []
        overflow = (
            f"the modules before it output finite values, so layer {layer!r} made it (an "
            "overflow of its output: weights or inputs grown too large), or a functional "
            "operation in the forward code between them did (e.g. log of 0)"
        )
    made_by_loss = False  # by a log of 0 in the loss, which no lr fixes (not an overflow)
    if where == "loss" and layer is not None:
        named = [exact] if exact and exact != layer else after(layer, config.context)
        peak = (row.get("output_max") or {}).get(layer, 0.0)
        made_by_loss = not peak > HUGE_OUTPUT
        text = _loss_text(row, step, layer, named, peak)
    elif layer is None:
        text = f"The loss became {row.get('loss')} at step {step} while no layer's values did."
    else:
        text = f"At step {step}, {_WHERE.get(where, where)} of layer {layer!r} is the first NaN/Inf"
        if named:
            text += (
                f"; its input is produced by the parameterless module(s) "
                f"{', '.join(repr(n) for n in named)}, "
                "so the NaN/Inf is made there (e.g. log or sqrt of a negative, 0/0, overflow)"
            )
        elif overflow:
            text += f"; {overflow}"
        elif unmeasured and not exact:
            text += (
                f" among the layers measured at that step ({len(unmeasured)} layers before it "
                "were not: deep models have their layers measured in turn), so one of those "
                "may have made it"
            )
        elif where == "forward" and layer == next(iter(config.context.get("layers") or []), None):
            text += "; no layer runs before it, so check the input batch for NaN/Inf"
        text += ". Every later layer and every gradient computed from it is NaN/Inf too."
    first_record = rows and row is next(iter(rows))
    remedies: list[Remedy] = []
    if (where != "forward" or not first_record) and not made_by_loss:
        # It appeared during training: steps too large inflated weights or gradients (K6).
        s = suggested(rows, config)
        setup = setup_of(config)
        remedies = [
            lower_lr(
                setup,
                s.lr_factor,
                f"too large a step inflates weights, then gradients: {s.lr_why} (K6)",
                s.lr,
            ),
        ]
        if s.clip_norm is not None:
            remedies.append(
                catalog.clip_norm(
                    s.clip_norm,
                    f"bounds every step whatever the gradient's size: {s.clip_why} (R7)",
                )
            )
    points = [
        Point(i, row_step(r, i), nonfinite_row(r), 1.0)
        for i, r in enumerate(rows)
        if any(k in r for k in ("nonfinite_origin", "loss", "global_grad_norm", "grad_norm"))
    ]
    ep = episode(points, larger, "non-finite")
    if ep is not None:
        ep = dataclasses.replace(ep, peak=ep.onset, peak_value=None)
    return [
        Finding(
            problem=Problem.NONFINITE,
            severity=Severity.CRITICAL,
            layers=[*named, layer] if layer else [],
            evidence={"layer": layer, "where": where, "step": step, "suspects": named},
            explanation=text,
            remedies=remedies,
            step=step,
            episode=ep,
        )
    ]
