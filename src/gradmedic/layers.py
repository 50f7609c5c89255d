"""Which modules count as layers, their parameters and their input-to-output order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

ROOT_NAME = "<root>"
#: Subsets of parameters whose layer grouping is kept (models that drop layers vary it).
SEGMENT_CACHE = 64


@dataclass
class Layer:
    """A module that directly owns at least one parameter.

    Attributes:
        name: Qualified module name (``"<root>"`` for the model itself).
        module: The module.
        params: ``(qualified parameter name, parameter)`` pairs it owns; a tied
            parameter belongs to the first module that owns it.
    """

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)


class LayerIndex:
    """The layers of a model, ordered from the input side to the output side.

    The order is registration order until the first forward pass with
    gradients is observed, then the order in which the layers' forwards
    finished (:meth:`set_forward_order`).
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers: list[Layer] = []
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            own = []
            for p_name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                own.append((f"{mod_name}.{p_name}" if mod_name else p_name, p))
            if own:
                self.layers.append(Layer(mod_name or ROOT_NAME, module, own))
        self._rebuild()

    def _rebuild(self) -> None:
        self.names: tuple[str, ...] = tuple(layer.name for layer in self.layers)
        self.by_name = {layer.name: layer for layer in self.layers}
        self.params: list[nn.Parameter] = [p for layer in self.layers for _, p in layer.params]
        self.param_names: tuple[str, ...] = tuple(
            n for layer in self.layers for n, _ in layer.params
        )
        self.param_layer: list[int] = [
            i for i, layer in enumerate(self.layers) for _ in layer.params
        ]
        self._segment_cache: dict[tuple, tuple[tuple[str, ...], torch.Tensor]] = {}

    def set_forward_order(self, names_in_order: list[str]) -> None:
        """Reorder layers by observed forward completion.

        A layer that did not run (a mixture's expert no token was routed to, a branch
        not taken) goes right after the layer registered before it, not after the
        output layer: depth profiles read the order as input side to output side.
        """
        rank = {n: i for i, n in enumerate(names_in_order)}
        placed = sorted(
            (layer for layer in self.layers if layer.name in rank), key=lambda la: rank[la.name]
        )
        previous: Layer | None = None
        for layer in self.layers:  # the current (registration) order
            if layer.name not in rank:
                at = placed.index(previous) + 1 if previous is not None else 0
                placed.insert(at, layer)
            previous = layer
        self.layers[:] = placed
        self._rebuild()

    def segments(
        self, positions: tuple[int, ...], device: torch.device
    ) -> tuple[tuple[str, ...], torch.Tensor]:
        """Group a subset of :attr:`params` (by position) into their layers.

        Returns the names of the layers present, input side first, and for each
        listed parameter the index of its layer among those names (the last
        ``SEGMENT_CACHE`` subsets are cached).
        """
        key = (positions, device)
        hit = self._segment_cache.get(key)
        if hit is None:
            present = sorted({self.param_layer[i] for i in positions})
            rank = {layer: k for k, layer in enumerate(present)}
            seg = torch.tensor(
                [rank[self.param_layer[i]] for i in positions], dtype=torch.long, device=device
            )
            hit = (tuple(self.layers[k].name for k in present), seg)
            if len(self._segment_cache) >= SEGMENT_CACHE:  # layer-dropping models: bounded
                self._segment_cache.pop(next(iter(self._segment_cache)))
            self._segment_cache[key] = hit
        return hit

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)


_ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ReLU6,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
    nn.Tanhshrink,
)


RECURRENT_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def has_recurrent(model: nn.Module) -> bool:
    """Whether ``model`` contains an nn.RNN, nn.LSTM or nn.GRU."""
    return any(isinstance(m, RECURRENT_TYPES) for m in model.modules())


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.nn's elementwise activation modules."""
    return isinstance(module, _ACTIVATIONS)


def following_activations(model: nn.Module, layer_names: list[str]) -> dict[str, str]:
    """For each layer, the class name of the first activation module registered after it.

    Registration order stands in for execution order (true for nn.Sequential
    and for most hand-written modules); a layer followed directly by another
    layer maps to nothing.
    """
    wanted = set(layer_names)
    out: dict[str, str] = {}
    current: str | None = None
    for name, module in model.named_modules():
        name = name or ROOT_NAME
        if name in wanted:
            current = name
        elif current is not None and is_activation(module):
            out[current] = type(module).__name__
            current = None
    return out


def weight_of(module: nn.Module | None) -> torch.Tensor | None:
    """``module.weight``, read without side effects (None when it has none).

    A parametrized weight (``nn.utils.parametrizations``) is computed on every read, and
    ``spectral_norm`` in training mode advances its power iteration (its ``_u``, ``_v``
    buffers) when read: the training would then depend on whether it was watched. Its
    parametrizations are read in eval mode, which only uses their state.
    """
    if module is None:
        return None
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if not isinstance(plist, nn.ModuleList):
        weight = getattr(module, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None
    modes = [(m, m.training) for m in plist.modules()]
    try:
        for m, _ in modes:
            m.training = False
        with torch.no_grad():
            weight = module.weight
    finally:
        for m, mode in modes:
            m.training = mode
    return weight if isinstance(weight, torch.Tensor) else None
