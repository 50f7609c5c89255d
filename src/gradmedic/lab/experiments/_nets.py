"""The small networks the remedy experiments train, and how to read their gradient profile."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

from torch import nn

import gradmedic


def mlp(
    sizes: Sequence[int],
    act: Callable[[], nn.Module],
    *,
    init: str | None = None,
    std: float | None = None,
    gain: float | None = None,
) -> nn.Sequential:
    """``Linear -> act`` for each hidden size, then a last ``Linear`` (no activation).

    Args:
        sizes: Layer widths, input first, classes last.
        act: Builds one activation module.
        init: A scheme for :func:`gradmedic.init.apply` ('he', 'xavier', ...); PyTorch's
            default (``U(+-1/sqrt(fan_in))``, variance ``1/(3 fan_in)``) if all three are None.
        std: Instead: weights ``N(0, std^2)`` whatever the width, biases 0.
        gain: Instead: weights ``N(0, gain^2 / fan_in)``, biases 0.
    """
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), act()]
    model = nn.Sequential(*layers[:-1])
    if init is not None:
        gradmedic.init.apply(model, init)
    for m in model:
        if isinstance(m, nn.Linear) and (std is not None or gain is not None):
            s = std if std is not None else cast(float, gain) / math.sqrt(m.in_features)
            nn.init.normal_(m.weight, 0.0, s)
            nn.init.zeros_(m.bias)
    return model


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules, in registration (input-to-output) order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def profile(row: dict[str, Any], names: Sequence[str]) -> list[float]:
    """Per-layer gradient norms of ``names`` from one monitor record (``row["grad_norm"]``)."""
    return [float(row["grad_norm"][n]) for n in names]
