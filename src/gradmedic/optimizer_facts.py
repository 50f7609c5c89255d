"""What the diagnosis needs to know about the optimizer, as plain data.

Example:
    >>> import torch
    >>> opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    >>> facts = optimizer_facts(opt)
    >>> facts["type"], facts["adaptive"], facts["lr"]
    ('AdamW', True, [0.001])
    >>> optimizer_facts(None) is None
    True
"""

from __future__ import annotations

from typing import Any

import torch

#: Optimizers that divide each step by a running gradient scale.
ADAPTIVE = frozenset(
    {
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Adafactor",
        "SparseAdam",
        "Lion",
        "Sophia",
    }
)


def optimizer_facts(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """Type, learning rates, momentum, betas and weight decay of ``optimizer`` (None: none).

    Values are per parameter group; a hyperparameter the optimizer lacks is left out.
    """
    if optimizer is None:
        return None
    groups = optimizer.param_groups
    facts: dict[str, Any] = {
        "type": type(optimizer).__name__,
        "adaptive": type(optimizer).__name__ in ADAPTIVE,
        "lr": [_plain(g.get("lr")) for g in groups],
    }
    for key in ("momentum", "betas", "weight_decay", "nesterov", "eps"):
        if all(key in g for g in groups):
            facts[key] = [_plain(g[key]) for g in groups]
    return facts


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
