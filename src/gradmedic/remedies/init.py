"""Re-initialize a model's weights so signals and gradients keep their size across layers.

``gradmedic.init.apply(model, scheme)`` re-initializes every Linear, Conv and
recurrent layer (never normalization layers or embeddings) in place and says
what it changed. Schemes (claim R4):

- ``"xavier"`` / ``"xavier_uniform"``, ``"xavier_normal"``: Glorot & Bengio 2010,
  ``Var(W) = gain^2 * 2 / (fan_in + fan_out)`` (gain 1 unless given).
- ``"he"`` / ``"kaiming"``: He et al. 2015, ``W ~ N(0, gain^2 / fan_in)`` with the gain of
  the activation module that follows each layer (see :func:`nonlinearity_after`).
- ``"orthogonal"``: Saxe et al. 2014, a (semi-)orthogonal matrix times ``gain``: every
  singular value equals ``gain``.
- ``"lecun"``: LeCun et al. 1998, ``W ~ N(0, 1 / fan_in)``.
- ``"lsuv"``: Mishkin & Matas 2016, orthogonal, then each layer in forward order is
  rescaled until its output variance on ``data`` is within ``tol`` of 1.
- ``"bias"``: set the biases of Linear/Conv layers to ``value`` (revives dead ReLUs, R3).
- ``"residual_zero"``: zero the last Linear/Conv layer of every residual block
  (SkipInit, De & Smith 2020; the zero-init of Fixup and of torchvision's
  ``zero_init_residual``): each block ``x + f(x)`` starts as the identity, so a deep
  residual stack without normalization no longer multiplies its signal and its
  gradient at every block. Nothing else changes.

Recurrent weights (``weight_ih``/``weight_hh`` of nn.RNN/LSTM/GRU and their cells) are
initialized one gate block at a time, so each gate's square ``H x H`` recurrent block is
itself orthogonal under ``"orthogonal"``. Every scheme but ``"bias"`` sets biases to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.layers import is_activation

__all__ = ["SCHEMES", "InitReport", "apply", "forget_gate_bias_", "nonlinearity_after"]

SCHEMES = (
    "xavier",
    "xavier_uniform",
    "xavier_normal",
    "he",
    "kaiming",
    "orthogonal",
    "lecun",
    "lsuv",
    "bias",
    "residual_zero",
)

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase)
_GATES = {nn.LSTM: 4, nn.LSTMCell: 4, nn.GRU: 3, nn.GRUCell: 3}


@dataclass
class InitReport:
    """What a re-initialization changed.

    Attributes:
        scheme: The scheme applied.
        layers: Qualified names of the modules whose parameters were set, in model order.
        gains: The gain used per layer (for ``"lsuv"``: the total factor applied after the
            orthogonal start; for ``"bias"``: the bias value).
        details: Scheme-specific numbers, e.g. ``{"nonlinearity": {layer: "relu"}}`` for
            ``"he"`` or ``{"variance": {layer: v}, "iterations": {layer: k}}`` for ``"lsuv"``.
    """

    scheme: str
    layers: list[str] = field(default_factory=list)
    gains: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.scheme} init on {len(self.layers)} layers: {', '.join(self.layers)}"


def apply(
    model: nn.Module,
    scheme: str,
    *,
    data: Any = None,
    value: float | None = None,
    gain: float | None = None,
    tol: float = 0.1,
    max_iter: int = 10,
) -> InitReport:
    """Re-initialize ``model``'s Linear, Conv and recurrent layers in place.

    Args:
        model: The model; changed in place.
        scheme: One of :data:`SCHEMES` (see the module docstring for the formulas).
        data: A batch for ``"lsuv"`` (a tensor, a tuple of positional inputs or a dict of
            keyword inputs to ``model``); ignored otherwise.
        value: The bias value for ``"bias"``.
        gain: Override the gain of ``"xavier*"`` and ``"orthogonal"`` (default 1).
        tol: ``"lsuv"``: stop when ``|Var(output) - 1| < tol``.
        max_iter: ``"lsuv"``: at most this many rescalings per layer.

    Returns:
        An :class:`InitReport` naming the layers changed and the gains used.

    Raises:
        GradmedicError: Unknown scheme, missing ``data``/``value``, or no layer to change.

    Example:
        >>> import torch, gradmedic
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> report = gradmedic.init.apply(model, "he")
        >>> report.details["nonlinearity"]
        {'0': 'relu', '2': 'linear'}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if scheme not in SCHEMES:
        raise GradmedicError(f"unknown init scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    targets = [(n or "<root>", m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    if scheme == "bias":
        return _set_bias(targets, value)
    if scheme == "residual_zero":
        return _zero_residual_branches(model)
    if not targets:
        raise GradmedicError(
            "the model has no Linear, Conv or RNN/LSTM/GRU layer to initialize; "
            "gradmedic.init only re-initializes those (never norms or embeddings)"
        )
    if scheme == "lsuv":
        return _lsuv(model, targets, data, tol, max_iter)
    report = InitReport(scheme)
    acts = nonlinearity_after(model) if scheme in ("he", "kaiming") else {}
    with torch.no_grad():
        for name, module in targets:
            if scheme in ("he", "kaiming"):
                nl, slope = acts.get(name, ("relu", 0.0))
                if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
                    nl, slope = getattr(module, "nonlinearity", "tanh"), 0.0
                init_fn = _kaiming(nl, slope)
                report.gains[name] = nn.init.calculate_gain(nl, slope)  # type: ignore[arg-type]
                report.details.setdefault("nonlinearity", {})[name] = nl
            else:
                init_fn, report.gains[name] = _fixed_gain_init(scheme, gain)
            _init_module(module, init_fn)
            report.layers.append(name)
    return report


def nonlinearity_after(model: nn.Module) -> dict[str, tuple[str, float]]:
    """For each Linear/Conv layer, the ``torch.nn.init`` nonlinearity of the activation after it.

    Registration order stands in for execution order (as in :mod:`gradmedic.layers`). The
    activation is the first activation module between the layer and the next
    Linear/Conv/RNN layer: ReLU/ReLU6 → ``"relu"``, LeakyReLU → ``("leaky_relu", slope)``,
    Tanh, Sigmoid, SELU → their own gains, other activations (ELU, GELU, SiLU, ...) →
    ``"relu"`` (their gain is close to ReLU's). A layer with no activation before the next
    layer (an output layer) gets ``"linear"``. If the model has no activation modules at
    all (activations called functionally in ``forward``), every layer gets ``"relu"``.

    Returns:
        ``{layer name: (nonlinearity, negative_slope)}``.
    """
    modules = list(model.named_modules())
    if not any(is_activation(m) for _, m in modules):
        return {n or "<root>": ("relu", 0.0) for n, m in modules if isinstance(m, _LAYERS)}
    out: dict[str, tuple[str, float]] = {}
    current: str | None = None
    for name, module in modules:
        if isinstance(module, _LAYERS):
            current = name or "<root>"
            out[current] = ("linear", 0.0)
        elif current is not None and is_activation(module):
            out[current] = _nonlinearity(module)
            current = None
    return out


def forget_gate_bias_(model: nn.Module, value: float = 1.0) -> InitReport:
    """Set every LSTM's forget-gate bias so that ``b_if + b_hf = value``.

    PyTorch orders the LSTM gates (input, forget, cell, output); the forget block is
    rows ``H:2H`` of both ``bias_ih`` and ``bias_hh``, each set to ``value / 2``. A
    positive value starts the forget gate near ``sigmoid(value)`` so the cell state, and
    the gradient along it (claim R8), is carried across steps (Gers et al. 2000;
    Jozefowicz et al. 2015 recommend 1).

    Args:
        model: A model containing nn.LSTM or nn.LSTMCell modules; changed in place.
        value: The total forget-gate bias.

    Returns:
        An :class:`InitReport` naming the LSTM modules changed.

    Example:
        >>> import torch, gradmedic
        >>> lstm = torch.nn.LSTM(3, 4)
        >>> _ = gradmedic.init.forget_gate_bias_(lstm, 1.0)
        >>> float((lstm.bias_ih_l0 + lstm.bias_hh_l0)[4:8].mean().detach())
        1.0
    """
    lstms = [(n or "<root>", m) for n, m in model.named_modules() if isinstance(m, _LSTMS)]
    if not lstms:
        raise GradmedicError("forget_gate_bias_ needs an nn.LSTM or nn.LSTMCell in the model")
    report = InitReport("forget_gate_bias", details={"value": float(value)})
    with torch.no_grad():
        for name, module in lstms:
            biases = [p for n, p in module.named_parameters(recurse=False) if n.startswith("bias")]
            for b in biases:
                h = b.shape[0] // 4
                b[h : 2 * h] = value / 2
            if biases:
                report.layers.append(name)
                report.gains[name] = float(value)
    if not report.layers:
        raise GradmedicError("the model's LSTMs were built with bias=False: no forget bias to set")
    return report


_LSTMS = (nn.LSTM, nn.LSTMCell)
InitFn = Callable[[torch.Tensor], Any]


def _nonlinearity(act: nn.Module) -> tuple[str, float]:
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", float(act.negative_slope)
    for cls, name in ((nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.SELU, "selu")):
        if isinstance(act, cls):
            return name, 0.0
    return "relu", 0.0


def _kaiming(nl: str, slope: float) -> InitFn:
    return lambda w: nn.init.kaiming_normal_(w, a=slope, nonlinearity=nl)  # type: ignore[arg-type]


def _fixed_gain_init(scheme: str, gain: float | None) -> tuple[InitFn, float]:
    g = 1.0 if gain is None else float(gain)
    fns: Mapping[str, InitFn] = {
        "xavier": lambda w: nn.init.xavier_uniform_(w, gain=g),
        "xavier_uniform": lambda w: nn.init.xavier_uniform_(w, gain=g),
        "xavier_normal": lambda w: nn.init.xavier_normal_(w, gain=g),
        "orthogonal": lambda w: nn.init.orthogonal_(w, gain=g),
        "lecun": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
    }
    return fns[scheme], (1.0 if scheme == "lecun" else g)


def _init_module(module: nn.Module, init_fn: InitFn) -> None:
    """Set a layer's weights with ``init_fn`` (per gate block if recurrent) and its biases to 0."""
    gates = next((k for cls, k in _GATES.items() if isinstance(module, cls)), 1)
    for pname, p in module.named_parameters(recurse=False):
        if pname.startswith("bias"):
            p.zero_()
        elif pname.startswith(("weight_ih", "weight_hh")) and gates > 1:
            for block in p.chunk(gates, 0):
                init_fn(block)
        elif pname.startswith("weight") and p.ndim >= 2:
            init_fn(p)


def _set_bias(targets: Sequence[tuple[str, nn.Module]], value: float | None) -> InitReport:
    if value is None:
        raise GradmedicError(
            "init scheme 'bias' needs value=..., e.g. "
            "gradmedic.init.apply(model, 'bias', value=0.01)"
        )
    report = InitReport("bias", details={"value": float(value)})
    with torch.no_grad():
        for name, module in targets:
            bias = getattr(module, "bias", None)
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and bias is not None:
                bias.fill_(float(value))
                report.layers.append(name)
                report.gains[name] = float(value)
    if not report.layers:
        raise GradmedicError("init scheme 'bias' found no Linear/Conv layer with a bias")
    return report


def residual_branch_ends(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The last Linear/Conv layer (registration order) inside each residual block."""
    from gradmedic.context import structure

    blocks = set(structure(model)["residual"])
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if (name or type(module).__name__) not in blocks:
            continue
        inner = [
            (f"{name}.{n}" if name else n, m)
            for n, m in module.named_modules()
            if n and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
        ]
        if inner:
            out.setdefault(*inner[-1])
    return list(out.items())


def _zero_residual_branches(model: nn.Module) -> InitReport:
    ends = residual_branch_ends(model)
    if not ends:
        raise GradmedicError(
            "init scheme 'residual_zero' found no residual block (a module whose forward "
            "adds a submodule's output to its input) with a Linear/Conv layer in it"
        )
    report = InitReport("residual_zero")
    with torch.no_grad():
        for name, module in ends:
            for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(param, torch.Tensor):
                    param.zero_()
            report.layers.append(name)
            report.gains[name] = 0.0
    return report


class _Stop(Exception):
    """Raised from a forward hook to end an LSUV forward pass early."""


def _lsuv(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Module]],
    data: Any,
    tol: float,
    max_iter: int,
) -> InitReport:
    if data is None:
        raise GradmedicError(
            "init scheme 'lsuv' needs a batch of inputs: gradmedic.init.apply(model, 'lsuv', "
            "data=batch) (LSUV scales each layer until its output variance on that batch is 1)"
        )
    report = InitReport("lsuv", details={"variance": {}, "iterations": {}})
    modes = {m: m.training for m in model.modules()}
    model.eval()  # dropout off, batch norm left untouched
    try:
        with torch.no_grad():
            for _, module in targets:
                _init_module(module, lambda w: nn.init.orthogonal_(w))
            scalable: dict[nn.Module, str] = {
                m: n for n, m in targets if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
            }
            for module in _forward_order(model, list(scalable), data):
                name = scalable[module]
                total, var, k = 1.0, math.nan, 0
                for k in range(1, max_iter + 1):  # noqa: B007 - k is reported
                    var = float(_output_of(model, module, data).float().var())
                    if not math.isfinite(var) or var <= 0 or abs(var - 1.0) < tol:
                        break
                    cast(torch.Tensor, module.weight).div_(math.sqrt(var))
                    total /= math.sqrt(var)
                report.layers.append(name)
                report.gains[name] = total
                report.details["variance"][name] = var
                report.details["iterations"][name] = k
    finally:
        for m, training in modes.items():
            m.training = training
    return report


def _call(model: nn.Module, data: Any) -> Any:
    if isinstance(data, Mapping):
        return model(**data)
    if isinstance(data, (tuple, list)):
        return model(*data)
    return model(data)


def _forward_order(model: nn.Module, modules: list[nn.Module], data: Any) -> list[nn.Module]:
    order: list[nn.Module] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if module not in order:
            order.append(module)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        _call(model, data)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_of(model: nn.Module, module: nn.Module, data: Any) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        _call(model, data)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise GradmedicError("LSUV: a layer seen in the first forward pass was not called again")
    return captured[0]
