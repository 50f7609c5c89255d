"""Architecture surgery: return a repaired copy of a model, leaving the original untouched.

Each function deep-copies the model, changes the copy's structure and keeps every
weight whose module survives the change:

- :func:`swap_activations` (R2, R3): e.g. Sigmoid → ReLU, ReLU → LeakyReLU.
- :func:`add_normalization` (R6): BatchNorm/LayerNorm after each Linear/Conv.
- :func:`residualize` (R1): ``x + f(x)`` around shape-preserving blocks.
- :func:`gate_recurrent` (R8, R9): nn.RNN → nn.LSTM / nn.GRU of the same sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.layers import is_activation

__all__ = [
    "LSTMAsRNN",
    "Residual",
    "add_normalization",
    "gate_recurrent",
    "residualize",
    "swap_activations",
]

Factory = Callable[[], nn.Module]
M = TypeVar("M", bound=nn.Module)  # surgery returns a modified copy of the model's own type


def swap_activations(
    model: M, mapping: Mapping[type[nn.Module] | str, type[nn.Module] | Factory | str]
) -> M:
    """Replace activation modules by others, e.g. ``{nn.Sigmoid: nn.ReLU}``.

    Args:
        model: The model (not modified).
        mapping: From an activation class (or its name in ``torch.nn``) to a class, a
            zero-argument factory (``lambda: nn.LeakyReLU(0.01)``) or a ``torch.nn``
            class name. A module matches its exact class first, then any base class.

    Returns:
        A new model with every matching module replaced (on the same device and dtype).

    Raises:
        GradmedicError: No module matched (activations called as functions in
            ``forward``, e.g. ``torch.sigmoid(x)``, are invisible to surgery).

    Example:
        >>> import torch, gradmedic
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
        >>> gradmedic.surgery.swap_activations(model, {nn.Sigmoid: nn.ReLU})[1]
        ReLU()
    """
    table = {_nn_class(k, "mapping key"): _factory(v) for k, v in mapping.items()}
    if not table:
        raise GradmedicError(
            "swap_activations needs a non-empty mapping, e.g. {nn.Sigmoid: nn.ReLU}"
        )
    new = copy.deepcopy(model)
    swapped = 0
    for parent, key, child in list(_children(new)):
        make = table.get(type(child)) or next(
            (f for cls, f in table.items() if isinstance(child, cls)), None
        )
        if make is not None:
            _set_child(parent, key, _like(make(), child, model))
            swapped += 1
    if not swapped:
        names = ", ".join(c.__name__ for c in table)
        raise GradmedicError(
            f"swap_activations found no {names} module in the model; activations called "
            "as functions inside forward() cannot be swapped: use nn modules for them"
        )
    return new


def add_normalization(model: M, kind: str = "batch") -> M:
    """Insert a normalization layer after each Linear/Conv layer except the last one.

    Rule: every nn.Linear and nn.Conv1d/2d/3d gets a norm right after it, so the norm
    sits between the layer and its activation (normalized pre-activations, claim R6),
    except the model's last Linear/Conv in registration order (the output layer, whose
    scale the loss needs) and layers already followed by a norm inside an nn.Sequential.
    Inside an nn.Sequential the norm is inserted as the next element; elsewhere the
    layer attribute is replaced by ``nn.Sequential(layer, norm)``.

    ``kind="batch"``: BatchNorm1d for Linear (inputs of shape (N, F)) and Conv1d,
    BatchNorm2d/3d for Conv2d/3d. ``kind="layer"``: LayerNorm over the features for
    Linear, GroupNorm with one group (LayerNorm over channels and positions) for Conv.

    Args:
        model: The model (not modified).
        kind: ``"batch"`` or ``"layer"``.

    Returns:
        A new model with the norms inserted (on the layers' device and dtype).

    Raises:
        GradmedicError: Unknown ``kind`` or no layer to normalize.

    Example:
        >>> import torch, gradmedic
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> [type(m).__name__ for m in gradmedic.surgery.add_normalization(model, kind="batch")]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    """
    if kind not in ("batch", "layer"):
        raise GradmedicError(f"kind must be 'batch' or 'layer', got {kind!r}")
    new = copy.deepcopy(model)
    found = [(p, k, c) for p, k, c in _children(new) if isinstance(c, _NORMALIZABLE)]
    if len(found) < 2:
        raise GradmedicError(
            "add_normalization needs at least two Linear/Conv layers (the last one, the "
            f"output layer, is never normalized); found {len(found)}"
        )
    inserts: dict[nn.Sequential, list[int]] = {}
    for parent, key, layer in found[:-1]:
        if isinstance(parent, nn.Sequential):
            i = int(key)
            nxt = parent[i + 1] if i + 1 < len(parent) else None
            if not isinstance(nxt, _NORMS):
                inserts.setdefault(parent, []).append(i)
        else:
            _set_child(parent, key, nn.Sequential(layer, _norm_for(layer, kind)))
    for seq, positions in inserts.items():
        items = list(seq)
        for i in sorted(positions, reverse=True):
            items.insert(i + 1, _norm_for(items[i], kind))
        _rebuild(seq, items)
    return new


class Residual(nn.Module):
    """``y = x + f(x)``: an identity path around ``f`` (claim R1).

    The Jacobian is ``I + df/dx``, so the gradient reaching ``x`` always keeps the
    term that bypasses ``f``'s weights.

    Args:
        fn: A module whose output has the shape of its input.
    """

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + fn(x)``."""
        return x + self.fn(x)


def residualize(model: M) -> M:
    """Wrap each shape-preserving block inside an nn.Sequential in a :class:`Residual`.

    A block starts at a shape-preserving layer (``nn.Linear(d, d)``; a Conv with as many
    output as input channels, stride 1 and "same" padding) and takes in the elementwise
    modules after it (activations, dropout, norms) up to the next layer with weights.
    Each block becomes ``Residual(nn.Sequential(layer, act, ...))``, i.e.
    ``x_{l+1} = x_l + F(x_l)``. Blocks that change the shape are left as they are.

    Args:
        model: The model (not modified).

    Returns:
        A new model with the residual wrappers (weights kept).

    Raises:
        GradmedicError: No nn.Sequential holds a shape-preserving block.

    Example:
        >>> import torch, gradmedic
        >>> from torch import nn
        >>> model = nn.Sequential(
        ...     nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
        ... )
        >>> new = gradmedic.surgery.residualize(model)
        >>> [type(m).__name__ for m in new]
        ['Linear', 'Tanh', 'Residual', 'Linear']
    """
    new = copy.deepcopy(model)
    wrapped = 0
    inner = {id(m.fn) for m in new.modules() if isinstance(m, Residual)}
    for seq in [m for m in new.modules() if isinstance(m, nn.Sequential) and id(m) not in inner]:
        out: list[nn.Module]
        items, out, i = list(seq), [], 0
        while i < len(items):
            j = i + 1
            if _preserves_shape(items[i]):
                while j < len(items) and _is_elementwise(items[j]):
                    j += 1
                out.append(Residual(nn.Sequential(*items[i:j])))
                wrapped += 1
            else:
                out.append(items[i])
            i = j
        if len(out) != len(items) or any(a is not b for a, b in zip(out, items, strict=True)):
            _rebuild(seq, out)
    if not wrapped:
        raise GradmedicError(
            "residualize found no shape-preserving block (Linear(d, d), or a Conv keeping "
            "channels and size) inside an nn.Sequential; a residual connection x + f(x) "
            "needs f to keep the shape of x"
        )
    return new


class LSTMAsRNN(nn.Module):
    """An nn.LSTM that returns ``(output, h_n)`` like nn.RNN, so calling code is unchanged.

    ``forward(input, hx=None)`` takes nn.RNN's ``h_0`` (the cell state starts at 0)
    and drops the final cell state ``c_n`` from the result.

    Args:
        lstm: The wrapped nn.LSTM.
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, input: Any, hx: torch.Tensor | None = None) -> tuple[Any, torch.Tensor]:
        """Run the LSTM; return ``(output, h_n)``."""
        state = None if hx is None else (hx, torch.zeros_like(hx))
        output, (h_n, _) = self.lstm(input, state)
        return output, h_n


def gate_recurrent(model: nn.Module, kind: str = "lstm", forget_bias: float = 1.0) -> nn.Module:
    """Replace every nn.RNN by a gated nn.LSTM or nn.GRU of the same sizes (claims R8, R9).

    Same ``input_size``, ``hidden_size``, ``num_layers``, ``bias``, ``batch_first``,
    ``dropout`` and ``bidirectional``, on the same device and dtype. nn.GRU returns
    ``(output, h_n)`` like nn.RNN and replaces it directly; an LSTM is wrapped in
    :class:`LSTMAsRNN` for the same signature. The gated layer is freshly initialized
    (its weights have other shapes); an LSTM gets forget-gate bias ``forget_bias``.

    Args:
        model: The model (not modified); may itself be an nn.RNN.
        kind: ``"lstm"`` or ``"gru"``.
        forget_bias: LSTM only: total forget-gate bias (see
            :func:`gradmedic.init.forget_gate_bias_`); ``None`` keeps PyTorch's init.

    Returns:
        The new model.

    Raises:
        GradmedicError: Unknown ``kind`` or no nn.RNN in the model.

    Example:
        >>> import torch, gradmedic
        >>> rnn = torch.nn.RNN(3, 5, batch_first=True)
        >>> gated = gradmedic.surgery.gate_recurrent(rnn, "gru")
        >>> out, h = gated(torch.randn(2, 7, 3))
        >>> tuple(out.shape), tuple(h.shape)
        ((2, 7, 5), (1, 2, 5))
    """
    if kind not in ("lstm", "gru"):
        raise GradmedicError(f"kind must be 'lstm' or 'gru', got {kind!r}")
    if isinstance(model, nn.RNN):
        return _gated(model, kind, forget_bias)
    new = copy.deepcopy(model)
    rnns = [(p, k, c) for p, k, c in _children(new) if isinstance(c, nn.RNN)]
    if not rnns:
        raise GradmedicError("gate_recurrent found no nn.RNN module in the model")
    for parent, key, rnn in rnns:
        _set_child(parent, key, _gated(rnn, kind, forget_bias))
    return new


_NORMALIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_ELEMENTWISE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _gated(rnn: nn.RNN, kind: str, forget_bias: float | None) -> nn.Module:
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    ref = next(rnn.parameters())
    gated = cls(
        rnn.input_size,
        rnn.hidden_size,
        num_layers=rnn.num_layers,
        bias=rnn.bias,
        batch_first=rnn.batch_first,
        dropout=rnn.dropout,
        bidirectional=rnn.bidirectional,
        device=ref.device,
        dtype=ref.dtype,
    )
    if kind == "gru":
        return gated
    if forget_bias is not None and rnn.bias:
        from gradmedic.remedies.init import forget_gate_bias_

        forget_gate_bias_(gated, forget_bias)
    return LSTMAsRNN(cast(nn.LSTM, gated))


def _children(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every submodule, in registration order."""
    return [
        (parent, key, child) for parent in root.modules() for key, child in parent.named_children()
    ]


def _set_child(parent: nn.Module, key: str, child: nn.Module) -> None:
    setattr(parent, key, child)  # also works for nn.Sequential / nn.ModuleList keys "0", "1"


def _rebuild(seq: nn.Sequential, items: list[nn.Module]) -> None:
    for key in list(seq._modules):
        del seq._modules[key]
    for i, m in enumerate(items):
        seq.add_module(str(i), m)


def _nn_class(spec: Any, what: str) -> type[nn.Module]:
    if isinstance(spec, str):
        cls = getattr(nn, spec, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
        raise GradmedicError(f"{what} {spec!r} is not a torch.nn module class name")
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec
    raise GradmedicError(f"{what} must be an nn.Module class or its name, got {spec!r}")


def _factory(spec: Any) -> Factory:
    if isinstance(spec, str):
        return _nn_class(spec, "mapping value")
    if callable(spec):
        return spec
    raise GradmedicError(
        f"mapping values must be nn.Module classes or zero-argument factories, got {spec!r}"
    )


def _like(new: Any, old: nn.Module, model: nn.Module) -> nn.Module:
    if not isinstance(new, nn.Module):
        raise GradmedicError(
            f"the replacement for {type(old).__name__} is not an nn.Module: {new!r}"
        )
    ref = next(old.parameters(), None)
    if ref is None:
        ref = next(model.parameters(), None)
    return new if ref is None else new.to(device=ref.device, dtype=ref.dtype)


def _norm_for(layer: nn.Module, kind: str) -> nn.Module:
    if isinstance(layer, nn.Linear):
        width = layer.out_features
        norm: nn.Module = nn.BatchNorm1d(width) if kind == "batch" else nn.LayerNorm(width)
    else:
        conv = cast(nn.modules.conv._ConvNd, layer)  # a Conv1d/2d/3d (_NORMALIZABLE)
        width = conv.out_channels
        if kind == "layer":
            norm = nn.GroupNorm(1, width)
        else:
            dims = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
            norm = dims[type(conv)](width)
    weight = cast(torch.Tensor, layer.weight)
    return norm.to(device=weight.device, dtype=weight.dtype)


def _preserves_shape(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.in_features == module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.in_channels != module.out_channels or any(s != 1 for s in module.stride):
            return False
        if module.padding == "same":
            return True
        if isinstance(module.padding, str):
            return False
        return all(
            2 * p == d * (k - 1)
            for p, d, k in zip(module.padding, module.dilation, module.kernel_size, strict=True)
        )
    return False


def _is_elementwise(module: nn.Module) -> bool:
    return is_activation(module) or isinstance(module, (*_ELEMENTWISE, *_NORMS))
