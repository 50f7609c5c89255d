"""Model-derived facts the recorded rows do not hold.

For the detectors' explanations, and for remedies that fit the setup (which
optimizer runs, what the model already has).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradmedic.layers import following_activations, is_activation, weight_of
from gradmedic.optimizer_facts import optimizer_facts

_MISSING: Any = object()

_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_GATED = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.GLU)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_RESIDUAL_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_RESIDUAL_NAME = re.compile(r"residual|resblock|basicblock|bottleneck|skip", re.IGNORECASE)
# ``x + self.f(...)``, ``self.f(...) + x``, ``x += self.f(...)``, ``x = x + ...``:
# a forward that adds its input (or a running state) to what a submodule made.
_RESIDUAL_SOURCE = re.compile(
    r"\b(\w+)\s*\+=\s*self\.\w+|\b(\w+)\s*\+\s*self\.\w+\("
    r"|self\.\w+\([^\n]*\)\s*\+\s*(?!self\b)([A-Za-z_]\w*)\b(?!\s*[.(\[])|\b(\w+)\s*=\s*\4\s*\+"
)


def structure(model: nn.Module) -> dict[str, list[str]]:
    """What the model already has, by module name.

    ``normalization`` (BatchNorm/LayerNorm/GroupNorm/...), ``residual`` (modules
    that add a submodule's output to their input: transformer layers, blocks
    named like residual blocks, or a ``forward`` whose source adds
    ``self.<module>(...)`` to a variable), ``gated`` (LSTM, GRU, GLU) and
    ``recurrent`` (every RNN/LSTM/GRU module or cell).
    """
    out: dict[str, list[str]] = {"normalization": [], "residual": [], "gated": [], "recurrent": []}
    for name, module in model.named_modules():
        label = name or type(module).__name__
        if isinstance(module, _NORMS) or "RMSNorm" in type(module).__name__:
            out["normalization"].append(label)
        if isinstance(module, _GATED):
            out["gated"].append(label)
        if isinstance(module, _RECURRENT):
            out["recurrent"].append(label)
        if _is_residual(module):
            out["residual"].append(label)
    return out


def _is_residual(module: nn.Module) -> bool:
    if isinstance(module, _RESIDUAL_TYPES):
        return True
    cls = type(module)
    if cls.__module__.startswith("torch.") or not any(True for _ in module.children()):
        return False
    if _RESIDUAL_NAME.search(cls.__name__):
        return True
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return bool(_RESIDUAL_SOURCE.search(source))


def fan_in_of(module: nn.Module | None, weight: Any) -> int | None:
    """Inputs summed into one output of ``module``'s ``weight`` (None: not a matmul weight).

    PyTorch's layout ``(out, in, *kernel)`` gives ``in * prod(kernel)``; Hugging Face's
    ``Conv1D`` (GPT-2) stores ``(in, out)``. An embedding is a lookup, not a sum over
    inputs: it has no fan-in, and its init scale is judged by no ``sqrt(fan_in)`` rule.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return None
    if type(module).__name__ == "Conv1D" and weight.dim() == 2:
        return int(weight.shape[0])
    return int(weight[0].numel())


def model_context(
    model: nn.Module,
    layers: Sequence[str],
    forward_order: Sequence[str] = (),
    *,
    optimizer: Any = _MISSING,
) -> dict[str, Any]:
    """Model-derived facts for the detectors' explanations and remedies.

    Args:
        model: The model.
        layers: Its layers (modules with parameters), input side first.
        forward_order: Names of the modules in the order their forwards
            finished, when a forward was traced; otherwise registration order
            stands in for it.
        optimizer: The training loop's optimizer, or None for a loop without
            one; leave it out when unknown (``check()``): then
            ``context["optimizer"]`` is absent. (``Monitor.diagnose()`` sets it
            itself, from :func:`gradmedic.optimizer_facts.optimizer_facts`.)

    Returns:
        ``{"activations": {layer: class name of the activation run after it},
        "weight_scale": {layer: std(W) * sqrt(fan_in)}, "layer_size": {layer: (elements
        of its own parameters, fan_in)}, "forward_order": [...],
        "structure": {"normalization": [...], "residual": [...], "gated": [...],
        "recurrent": [...]}}`` plus ``"optimizer"`` (``{"type", "adaptive", "lr",
        ...}`` or None, :func:`~gradmedic.optimizer_facts.optimizer_facts`) when given.
    """
    modules = dict(model.named_modules())
    acts: dict[str, str] = {}
    if forward_order:
        wanted, current = set(layers), None
        for name in forward_order:
            if name in wanted:
                current = name
            elif current is not None and is_activation(modules[name]):
                acts[current] = type(modules[name]).__name__
                current = None
    else:
        acts = following_activations(model, list(layers))
    scales: dict[str, float] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for name in layers:
        module = modules.get(name)
        weight = weight_of(module)
        fan_in = fan_in_of(module, weight)
        if fan_in is not None and isinstance(weight, torch.Tensor) and weight.numel() > 1:
            scales[name] = float(weight.detach().float().std() * math.sqrt(fan_in))
            numel = sum(p.numel() for p in modules[name].parameters(recurse=False))
            sizes[name] = (numel, fan_in)
    out: dict[str, Any] = {
        "activations": acts,
        "weight_scale": scales,
        "layer_size": sizes,
        "forward_order": list(forward_order),
        "structure": structure(model),
    }
    if optimizer is not _MISSING:
        out["optimizer"] = optimizer_facts(optimizer)
    return out
