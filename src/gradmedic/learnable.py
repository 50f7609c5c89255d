"""Is there anything to learn in these examples? A linear reference on held-apart ones.

A trial run that does not fit its examples says the configuration cannot train
only when the examples can be learned at all: random labels or targets cannot,
and a net that does not fit them is healthy. The reference is ridge regression
from the flattened inputs to the targets (one-hot for class labels), fitted on
three quarters of the examples and scored on the quarter held apart, against the
best constant prediction (the mean of the fitted targets) on the same quarter.

Example:
    >>> import torch
    >>> x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    >>> linear_headroom(x, (x[:, 0] > 0).long()) < 0.9  # a linear rule: learnable
    True
    >>> noise = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(1))
    >>> linear_headroom(x, noise) > 0.9  # labels unrelated to the inputs
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Share of the examples held apart for scoring.
HOLDOUT = 0.25
#: Ridge strength relative to the mean squared norm of the centred inputs: strong, so
#: the reference does not overfit a few hundred examples; it only has to find signal.
RIDGE = 1.0


def _features(inputs: Any) -> torch.Tensor | None:
    """The first floating-point tensor of ``inputs``, flattened per example."""
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() and inputs.dim() >= 1:
            return inputs.detach().reshape(inputs.shape[0], -1).double().cpu()
        return None
    if isinstance(inputs, list | tuple):
        return next((f for f in map(_features, inputs) if f is not None), None)
    return None


def _targets(targets: Any, n: int) -> torch.Tensor | None:
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != n:
        return None
    y = targets.detach().cpu()
    if y.is_floating_point():
        return y.reshape(n, -1).double()
    if y.dim() != 1 or int(y.min()) < 0:
        return None
    return torch.nn.functional.one_hot(y, int(y.max()) + 1).double()


def linear_headroom(inputs: Any, targets: Any, *, seed: int = 0) -> float:
    """Held-apart MSE of a ridge fit over that of the constant prediction (nan: not known).

    Below 1: the inputs predict the targets, linearly; 1 or more: nothing a linear
    model finds (labels unrelated to the inputs, or too few examples to tell).

    Args:
        inputs: A tensor, or a tuple/list whose first floating-point tensor is used.
        targets: Class labels (integers) or float targets, one per example.
        seed: Seed of the split.
    """
    x = _features(inputs)
    if x is None:
        return math.nan
    n = x.shape[0]
    y = _targets(targets, n)
    held = int(n * HOLDOUT)
    if y is None or held < 2 or n - held < 2:
        return math.nan
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, test = order[held:], order[:held]
    x_mean, y_mean = x[fit].mean(0), y[fit].mean(0)
    xf, yf = x[fit] - x_mean, y[fit] - y_mean
    gram = xf @ xf.T  # the dual form: n x n, whatever the input size
    ridge = RIDGE * float(gram.diagonal().mean()) + 1e-12
    alpha = torch.linalg.solve(gram + ridge * torch.eye(len(fit), dtype=gram.dtype), yf)
    predicted = (x[test] - x_mean) @ xf.T @ alpha + y_mean
    constant = float((y[test] - y_mean).pow(2).mean())
    if not (math.isfinite(constant) and constant > 0):
        return math.nan
    return float((y[test] - predicted).pow(2).mean()) / constant
