"""Mean-field gradient-gain prediction for a real fully connected ``nn.Module``.

The model is read as a chain ``x -> [phi_0] -> Linear_1 -> phi_1 -> ... -> Linear_L``
(``phi_l`` zero or more elementwise activations, composed). Each Linear's
``sigma_w^2 = fan_in * Var(W)`` and ``sigma_b^2 = mean(b^2)`` are measured on its
actual weights (the bias's second moment, so that a constant bias counts too),
and the variance map is iterated from the input variance (see
:func:`gradmedic.theory.meanfield.propagate`). Anything the theory does not
describe (convolutions, normalization, attention, recurrence, residual or other
non-chain wiring, unknown modules, weights with a mean far from zero) yields a
prediction with ``covered=False`` and the reason, never a guess.

The prediction is for wide layers (it averages over units: expect a few percent
of finite-width noise at width ~256) and random-looking weights, as at
initialization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradmedic.theory.activations import Activation, compose, get_activation
from gradmedic.theory.meanfield import propagate

# fan_in * mean(W)^2 above this fraction of Var(W): the mean adds a coherent
# component comparable to the random one, and mean-field theory does not hold.
MAX_WEIGHT_MEAN = 0.1

_MODULE_ACTIVATIONS: dict[type[nn.Module], Callable[[Any], Activation]] = {
    nn.ReLU: lambda m: get_activation("relu"),
    nn.LeakyReLU: lambda m: get_activation("leaky_relu", slope=float(m.negative_slope)),
    nn.ELU: lambda m: get_activation("elu", alpha=float(m.alpha)),
    nn.Tanh: lambda m: get_activation("tanh"),
    nn.Sigmoid: lambda m: get_activation("sigmoid"),
    nn.Softplus: lambda m: get_activation("softplus", beta=float(m.beta)),
    nn.GELU: lambda m: get_activation("gelu", approximate=m.approximate),
    nn.SiLU: lambda m: get_activation("silu"),
}


def _arg(node: torch.fx.Node, index: int, key: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


_FUNCTION_ACTIVATIONS: dict[Any, Callable[[torch.fx.Node], Activation]] = {
    torch.relu: lambda n: get_activation("relu"),
    F.relu: lambda n: get_activation("relu"),
    torch.tanh: lambda n: get_activation("tanh"),
    F.tanh: lambda n: get_activation("tanh"),
    torch.sigmoid: lambda n: get_activation("sigmoid"),
    F.sigmoid: lambda n: get_activation("sigmoid"),
    F.silu: lambda n: get_activation("silu"),
    F.gelu: lambda n: get_activation("gelu", approximate=_arg(n, 1, "approximate", "none")),
    F.elu: lambda n: get_activation("elu", alpha=float(_arg(n, 1, "alpha", 1.0))),
    F.leaky_relu: lambda n: get_activation(
        "leaky_relu", slope=float(_arg(n, 1, "negative_slope", 0.01))
    ),
    F.softplus: lambda n: get_activation("softplus", beta=float(_arg(n, 1, "beta", 1.0))),
}
_METHOD_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_SHAPE_OPS = (torch.flatten, "flatten")

_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
      nn.ConvTranspose3d), "a convolution"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
      nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
      *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else [])), "normalization"),  # torch >= 2.4
    ((nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer,
      nn.TransformerDecoderLayer), "attention"),
    ((nn.RNNBase, nn.RNNCellBase), "recurrent"),
    ((nn.Embedding, nn.EmbeddingBag), "an embedding"),
)  # fmt: skip

_SCOPE = "the mean-field prediction covers chains of Linear layers and elementwise activations"


class _NotCovered(Exception):
    """Internal: the model falls outside the theory (message = reason)."""


Element = tuple[str, "nn.Linear | Activation | None"]  # None: a value-preserving step


@dataclass(frozen=True)
class GainPrediction:
    """Predicted per-layer gradient gains of a fully connected model.

    Attributes:
        covered: Whether the theory covers the model; if not, ``reason`` says why
            and the numbers are empty / ``nan``.
        reason: Why the model is not covered (empty when covered).
        layers: Names of the Linear layers, input side first.
        activations: The (composed) activation after each Linear (``"linear"`` if none).
        sigma_w2: ``fan_in * Var(W)`` per Linear, from its weights.
        sigma_b2: ``mean(b^2)`` per Linear (0 without bias).
        q: Predicted variance of each Linear's output (pre-activation).
        gains: ``gains[i]`` predicts ``||dL/dh_i|| / ||dL/dh_{i+1}||`` for the outputs
            ``h`` of ``layers[i]`` and ``layers[i + 1]``:
            ``sqrt(sigma_w2[i + 1] * E[phi_i'(h)^2])``, ``h ~ N(0, q[i])``.
        input_variance: The input's per-component second moment assumed.
    """

    covered: bool
    reason: str = ""
    layers: tuple[str, ...] = ()
    activations: tuple[str, ...] = ()
    sigma_w2: tuple[float, ...] = ()
    sigma_b2: tuple[float, ...] = ()
    q: tuple[float, ...] = ()
    gains: tuple[float, ...] = ()
    input_variance: float = 1.0

    @property
    def geometric_mean_gain(self) -> float:
        """``(prod gains)^(1 / len(gains))``; ``nan`` if not covered."""
        if not self.gains:
            return math.nan
        return float(np.exp(np.mean(np.log(self.gains))))

    @property
    def input_output_ratio(self) -> float:
        """Predicted ``||dL/dh_first|| / ||dL/dh_last||`` (first and last Linear outputs)."""
        return float(np.prod(self.gains)) if self.gains else math.nan

    @property
    def relative_delta_norms(self) -> dict[str, float]:
        """Predicted ``||dL/dh_l|| / ||dL/dh_last||`` per layer (compare with ``delta_norm``)."""
        if not self.covered:
            return {}
        tail = np.cumprod(np.asarray(self.gains[::-1], dtype=np.float64))[::-1]
        return dict(zip(self.layers, [*map(float, tail), 1.0], strict=True))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON (non-finite numbers as strings)."""
        from gradmedic.findings import _plain

        return _plain(
            {
                "covered": self.covered,
                "reason": self.reason,
                "layers": list(self.layers),
                "activations": list(self.activations),
                "sigma_w2": list(self.sigma_w2),
                "sigma_b2": list(self.sigma_b2),
                "q": list(self.q),
                "gains": list(self.gains),
                "geometric_mean_gain": self.geometric_mean_gain,
                "input_output_ratio": self.input_output_ratio,
                "input_variance": self.input_variance,
            }
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _leaf(name: str, module: nn.Module) -> list[Element]:
    """Classify one module that is not a container."""
    if isinstance(module, nn.Linear):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise _NotCovered(f"layer '{name}' is not initialized yet: run one forward pass first")
        return [(name, module)]
    kind = type(module)
    if kind in _MODULE_ACTIVATIONS:
        return [(name, _MODULE_ACTIVATIONS[kind](module))]
    if isinstance(module, nn.Identity | nn.Flatten):
        return [(name, None)]
    if isinstance(module, nn.Dropout | nn.AlphaDropout):
        if module.training and module.p > 0:
            raise _NotCovered(
                f"'{name}' is dropout in training mode (it rescales the variance): "
                "call model.eval() before predicting"
            )
        return [(name, None)]
    for types, what in _KINDS:
        if isinstance(module, types):
            raise _NotCovered(f"'{name}' is {what} ({kind.__name__}); {_SCOPE}")
    if not any(True for _ in module.children()):
        raise _NotCovered(f"'{name}' is an unknown module ({kind.__name__}); {_SCOPE}")
    return _traced(name, module)


def _elements(name: str, module: nn.Module) -> list[Element]:
    """The modules/functions that ``module`` applies, in execution order."""
    if isinstance(module, nn.Sequential):
        return [
            e for child, sub in module.named_children() for e in _elements(_join(name, child), sub)
        ]
    return _leaf(name, module)


def _traced(name: str, module: nn.Module) -> list[Element]:
    """Read a custom module's forward with torch.fx; it must be a plain chain."""
    label = f"'{name}'" if name else "the model"
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # fx raises many types for untraceable code
        raise _NotCovered(
            f"could not trace the forward of {label} ({type(module).__name__}) with torch.fx "
            f"({type(exc).__name__}); {_SCOPE}, as nn.Sequential or a traceable chain"
        ) from None
    out: list[Element] = []
    previous: torch.fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                raise _NotCovered(f"the forward of {label} takes more than one input; {_SCOPE}")
            previous = node
            continue
        if node.all_input_nodes != [previous]:
            raise _NotCovered(
                f"the forward of {label} combines several tensors at '{node.name}' "
                f"({node.target}): residual connections and other non-chain wiring are not "
                f"covered; {_SCOPE}"
            )
        if node.op == "output":
            break
        if node.op == "call_module":
            out.extend(_elements(_join(name, node.target), module.get_submodule(node.target)))
        elif node.op == "call_function" and node.target in _FUNCTION_ACTIVATIONS:
            out.append((_join(name, node.name), _FUNCTION_ACTIVATIONS[node.target](node)))
        elif node.op == "call_method" and node.target in _METHOD_ACTIVATIONS:
            out.append((_join(name, node.name), get_activation(_METHOD_ACTIVATIONS[node.target])))
        elif node.target in _SHAPE_OPS:
            out.append((_join(name, node.name), None))
        else:
            raise _NotCovered(
                f"the forward of {label} applies {node.target!r} at '{node.name}', which is "
                f"not an elementwise activation; {_SCOPE}"
            )
        previous = node
    return out


def _weight_stats(name: str, layer: nn.Linear) -> tuple[float, float]:
    w = layer.weight.detach().double()
    mean, var = float(w.mean()), float(w.var(unbiased=False))
    fan_in = layer.in_features
    # A mean counts only if it is also beyond sampling noise (std / sqrt(numel), 4 sigma).
    if fan_in * mean * mean > max(MAX_WEIGHT_MEAN, 16.0 / layer.out_features) * var:
        raise _NotCovered(
            f"the weights of '{name}' have mean {mean:.3g}, far from zero for their spread "
            f"(std {math.sqrt(var):.3g}, fan-in {fan_in}); mean-field theory assumes zero-mean "
            "random weights"
        )
    b2 = 0.0 if layer.bias is None else float(layer.bias.detach().double().pow(2).mean())
    return fan_in * var, b2


def predicted_gain(model: nn.Module, input_variance: float = 1.0) -> GainPrediction:
    """Predict the per-layer gradient gains of a fully connected model by mean-field theory.

    Args:
        model: An ``nn.Sequential`` (possibly nested) or a module whose forward is a
            traceable chain of Linear layers and elementwise activations.
        input_variance: Second moment ``E[x_i^2]`` of each input component (the input
            is treated as Gaussian when an activation is applied to it directly).

    Returns:
        A :class:`GainPrediction`; ``covered=False`` with a reason when the model
        is outside the theory.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
        >>> _ = nn.init.kaiming_normal_(net[0].weight)  # sigma_w^2 = 2
        >>> _ = nn.init.kaiming_normal_(net[2].weight)
        >>> round(predicted_gain(net).gains[0], 2)  # sqrt(2 * 1/2)
        1.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    v = float(input_variance)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"input_variance must be a finite number > 0, got {input_variance!r}")
    try:
        return _predict(model, v)
    except _NotCovered as exc:
        return GainPrediction(covered=False, reason=str(exc), input_variance=v)


def _predict(model: nn.Module, v: float) -> GainPrediction:
    lead: list[Activation] = []
    linears: list[tuple[str, nn.Linear]] = []
    after: list[list[Activation]] = []
    for name, element in _elements("", model):
        if isinstance(element, nn.Linear):
            if linears and element.in_features != linears[-1][1].out_features:
                raise _NotCovered(
                    f"'{name}' takes {element.in_features} features but the Linear before it "
                    f"gives {linears[-1][1].out_features}: the layers do not form a chain"
                )
            linears.append((name, element))
            after.append([])
        elif element is not None:
            (after[-1] if after else lead).append(element)
    if len(linears) < 2:
        raise _NotCovered(f"found {len(linears)} Linear layer(s); gains need at least two")
    stats = [_weight_stats(name, layer) for name, layer in linears]
    acts = [compose(a) for a in after]
    result = propagate(
        acts, [s[0] for s in stats], [s[1] for s in stats], v, input_activation=compose(lead)
    )
    return GainPrediction(
        covered=True,
        layers=tuple(name for name, _ in linears),
        activations=tuple(a.name for a in acts),
        sigma_w2=tuple(s[0] for s in stats),
        sigma_b2=tuple(s[1] for s in stats),
        q=result.q,
        gains=result.gains,
        input_variance=v,
    )
