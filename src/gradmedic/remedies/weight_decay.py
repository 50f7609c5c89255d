"""L2 weight decay on the weights only (claim R5), added to an existing optimizer."""

from __future__ import annotations

import torch
from torch import nn

from gradmedic.errors import GradmedicError

__all__ = ["add_weight_decay", "decayed_parameters"]

_DECAYED_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase)


def decayed_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter that should be decayed: weights of Linear/Conv/RNN layers.

    Biases, normalization gains and shifts and embeddings are not: shrinking them does
    not bound the product of Jacobians that makes gradients explode, and decaying a
    norm's gain or an embedding only hurts the fit.
    """
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, _DECAYED_MODULES):
            for name, p in module.named_parameters(recurse=False):
                if name.startswith("weight"):
                    out.add(id(p))
    return out


def add_weight_decay(
    optimizer: torch.optim.Optimizer, model: nn.Module, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    r"""Split each parameter group so that only the model's weights are decayed.

    Every group becomes up to three groups with the original settings: the weights of
    Linear/Conv/RNN layers with ``weight_decay`` (the optimizer adds
    ``weight_decay * w`` to the gradient, i.e. an L2 penalty
    :math:`\frac{\lambda}{2}\|w\|^2`; AdamW decouples it), the model's other parameters
    (biases, norms, embeddings) with ``weight_decay=0``, and parameters that are not
    the model's, unchanged. Optimizer state (momenta, Adam moments) is keyed by
    parameter and kept. Call it before creating an LR scheduler, which counts groups.

    Args:
        optimizer: The optimizer; changed in place.
        model: The model whose parameters the optimizer trains.
        weight_decay: The decay coefficient for the weights.

    Returns:
        The same optimizer.

    Raises:
        GradmedicError: ``weight_decay`` is negative or the optimizer trains none of
            the model's parameters.

    Example:
        >>> import torch, gradmedic
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt = gradmedic.add_weight_decay(opt, model, weight_decay=1e-4)
        >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
        [(1, 0.0001), (3, 0.0)]
    """
    if weight_decay < 0:
        raise GradmedicError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed = decayed_parameters(model)
    owned = {id(p) for p in model.parameters()}
    if not any(id(p) in owned for g in optimizer.param_groups for p in g["params"]):
        raise GradmedicError(
            "the optimizer trains none of the model's parameters: pass the model it was built for"
        )
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        parts = (
            ([p for p in group["params"] if id(p) in decayed], float(weight_decay)),
            ([p for p in group["params"] if id(p) in owned and id(p) not in decayed], 0.0),
            ([p for p in group["params"] if id(p) not in owned], group.get("weight_decay", 0.0)),
        )
        for params, decay in parts:
            if params:
                groups.append({**settings, "params": params, "weight_decay": decay})
    optimizer.param_groups.clear()
    optimizer.param_groups.extend(groups)
    return optimizer
