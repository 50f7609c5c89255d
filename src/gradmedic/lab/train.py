"""A small training loop shared by the lab's experiments."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradmedic.lab.data import Dataset


@dataclass
class Curves:
    """What happened during training, one entry per step (accuracies per evaluation).

    Attributes:
        loss: Training loss of each step's batch (``nan`` once it is non-finite).
        grad_norm: Global L2 norm of the gradient at each step.
        param_norm: Global L2 norm of the parameters after each step.
        test_accuracy: ``(step, accuracy)`` at each evaluation.
        diverged: The loss became non-finite (training stopped there).
    """

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    param_norm: list[float] = field(default_factory=list)
    test_accuracy: list[tuple[int, float]] = field(default_factory=list)
    diverged: bool = False

    @property
    def final_accuracy(self) -> float:
        """The last test accuracy (nan if never evaluated)."""
        return self.test_accuracy[-1][1] if self.test_accuracy else math.nan


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``model`` classifies as ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch_size: int = 64,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> Curves:
    """Train ``model`` on ``data`` for ``steps`` minibatch steps.

    Batches are drawn by a generator seeded with ``seed`` (epochs of a fixed
    permutation), so a run is reproducible. Training stops early when the loss
    becomes non-finite.

    Args:
        model: Maps ``(batch, features)`` to ``(batch, classes)`` logits.
        data: The data set.
        optimizer: Any torch optimizer over the model's parameters.
        steps: Number of optimizer steps.
        batch_size: Examples per step.
        loss_fn: ``loss(logits, labels)``; cross-entropy by default.
        eval_every: Test accuracy every this many steps (0: only at the end).
        seed: Seed of the batch order.
        on_step: Called with the step index after ``loss.backward()`` and before
            ``optimizer.step()`` (to read gradients).

    Returns:
        The training curves.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    order = torch.randperm(n, generator=gen)
    pos = 0
    curves = Curves()
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        curves.grad_norm.append(_global_norm(grads))
        if on_step is not None:
            on_step(step)
        optimizer.step()
        curves.loss.append(float(loss.detach()))
        curves.param_norm.append(_global_norm([p.detach() for p in params]))
        if not math.isfinite(curves.loss[-1]):
            curves.diverged = True
            break
        if eval_every and (step + 1) % eval_every == 0:
            curves.test_accuracy.append((step + 1, accuracy(model, data.x_test, data.y_test)))
    if not curves.diverged and (not curves.test_accuracy or curves.test_accuracy[-1][0] != steps):
        curves.test_accuracy.append((steps, accuracy(model, data.x_test, data.y_test)))
    return curves


def _global_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))
