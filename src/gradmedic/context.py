"""Model-derived facts the recorded rows do not hold, for the detectors' explanations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradmedic.layers import following_activations, is_activation


def model_context(
    model: nn.Module, layers: Sequence[str], forward_order: Sequence[str] = ()
) -> dict[str, Any]:
    """Model-derived facts for the detectors' explanations.

    Args:
        model: The model.
        layers: Its layers (modules with parameters), input side first.
        forward_order: Names of the modules in the order their forwards
            finished, when a forward was traced; otherwise registration order
            stands in for it.

    Returns:
        ``{"activations": {layer: class name of the activation run after it},
        "weight_scale": {layer: std(W) * sqrt(fan_in)}, "forward_order": [...]}``.
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
    for name in layers:
        weight = getattr(modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.numel() > 1:
            w = weight.detach().float()
            scales[name] = float(w.std() * math.sqrt(w[0].numel()))
    return {"activations": acts, "weight_scale": scales, "forward_order": list(forward_order)}
