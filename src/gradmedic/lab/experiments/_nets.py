"""The small networks the lab's experiments train, and how to read their gradient profile."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

import gradmedic
from gradmedic.lab.data import Dataset
from gradmedic.lab.train import Curves, train


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


def train_profiled(
    model: nn.Module,
    dataset: Dataset,
    opt: torch.optim.Optimizer,
    *,
    steps: int,
    batch_size: int,
    seed: int,
) -> tuple[Curves, list[float]]:
    """Train ``model``; also the per-Linear gradient norms of step 0, from gradmedic.watch."""
    names = linear_names(model)
    with gradmedic.watch(model, opt, every=lambda s: s == 0, deltas=False, updates=False) as mon:
        curves = train(model, dataset, opt, steps=steps, batch_size=batch_size, seed=seed)
        grads = profile(mon.history.rows()[0], names)
    return curves, grads


def final_loss(curves: Curves, steps: int) -> float:
    """Mean training loss over the last 10% of ``steps`` (infinite if training diverged)."""
    if curves.diverged:
        return math.inf
    return statistics.fmean(curves.loss[-max(1, steps // 10) :])
