"""Broken (and healthy) training setups built from the claims, for tests, benchmarks and docs.

Each function returns a :class:`~gradmedic.autorepair.Setup` on real data: the
digits images bundled with scikit-learn (8x8, 10 classes; the seeds' MNIST) or
the adding problem (Hochreiter & Schmidhuber 1997: sum the two marked numbers of
a sequence). ``EXAMPLES`` maps a name to its builder.

Example:
    >>> setup = EXAMPLES["deep_sigmoid"]()
    >>> setup.resolved_metric.name
    'accuracy'
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import cache
from typing import cast

import torch
from torch import nn

from gradmedic.autorepair.problem import Setup

Pair = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)


@cache
def digits(seed: int = 0) -> tuple[Pair, Pair]:
    """``((x_train, y_train), (x_val, y_val))``: sklearn digits scaled to [0, 1], 400 held out."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    xs = torch.as_tensor(x, dtype=torch.float32)[order] / 16.0
    ys = torch.as_tensor(y, dtype=torch.long)[order]
    return (xs[400:], ys[400:]), (xs[:400], ys[:400])


@cache
def adding(length: int = 20, n: int = 1200, seed: int = 0) -> tuple[Pair, Pair]:
    """The adding problem: inputs ``(n, length, 2)`` (value, marker), target the marked sum.

    Predicting the mean scores an MSE of Var(u1 + u2) = 2/12 = 0.167.
    """
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    marks = torch.zeros(n, length)
    for i in range(n):
        a, b = torch.randperm(length, generator=g)[:2]
        marks[i, a] = marks[i, b] = 1.0
    x = torch.stack([values, marks], dim=-1)
    y = (values * marks).sum(dim=1, keepdim=True)
    cut = n // 6
    return (x[cut:], y[cut:]), (x[:cut], y[:cut])


def mlp(
    act: type[nn.Module],
    depth: int,
    width: int,
    weight_std: float | None = None,
    bias: float | None = None,
    he: bool = False,
) -> nn.Sequential:
    """64 -> width x depth -> 10 with activation ``act``.

    Optionally N(0, std²) weights, constant biases, or He init.
    """
    sizes = [64] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        linear = nn.Linear(a, b)
        if weight_std is not None:
            nn.init.normal_(linear.weight, 0.0, weight_std)
        if he:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        if bias is not None:
            nn.init.constant_(linear.bias, bias)
        layers += [linear, act()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class AddingRNN(nn.Module):
    """An RNN reading the sequence, a linear head on the last hidden state."""

    def __init__(
        self, hidden: int = 32, radius: float | None = None, nonlinearity: str = "tanh"
    ) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity=nonlinearity)
        self.head = nn.Linear(hidden, 1)
        if radius is not None:  # W_h = radius * orthogonal: every singular value is `radius`
            w_hh = cast(torch.Tensor, self.rnn.weight_hh_l0)
            nn.init.orthogonal_(w_hh)
            with torch.no_grad():
                w_hh.mul_(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden state -> sum estimate."""
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _digits_setup(model: Callable[[], nn.Module], lr: float) -> Setup:
    return Setup(
        model,
        digits(),
        nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        metric="accuracy",
    )


def deep_sigmoid() -> Setup:
    """K2: ten sigmoid layers of 32 units, default init: the gradient shrinks toward the input."""
    return _digits_setup(lambda: mlp(nn.Sigmoid, depth=10, width=32), lr=0.1)


def relu_normal_init() -> Setup:
    """R4: ReLU MLP with N(0, 1) weights: each layer multiplies the signal by ~sqrt(fan_in/2)."""
    return _digits_setup(lambda: mlp(nn.ReLU, depth=6, width=64, weight_std=1.0), lr=0.01)


def dead_relu() -> Setup:
    """R3: ReLU MLP (He init) whose biases are -3: most units never fire."""
    return _digits_setup(lambda: mlp(nn.ReLU, depth=4, width=64, bias=-3.0, he=True), lr=0.05)


def high_lr() -> Setup:
    """K6: a healthy He-initialized ReLU MLP trained with SGD at learning rate 5."""
    return _digits_setup(lambda: mlp(nn.ReLU, depth=4, width=64, he=True), lr=5.0)


def exploding_rnn() -> Setup:
    """K5: a ReLU RNN on the adding problem with all singular values of W_h at 2.5."""
    return Setup(
        lambda: AddingRNN(radius=2.5, nonlinearity="relu"),
        adding(),
        nn.MSELoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
    )


def tiny_init_tanh() -> Setup:
    """A 15-layer tanh MLP with N(0, 0.05²) weights: each layer scales the gradient by ~0.3."""
    return _digits_setup(lambda: mlp(nn.Tanh, depth=15, width=32, weight_std=0.05), lr=0.1)


def small_init_relu() -> Setup:
    """A 15-layer ReLU MLP with N(0, 0.05²) weights: the signal shrinks ~0.2x per layer."""
    return _digits_setup(lambda: mlp(nn.ReLU, depth=15, width=32, weight_std=0.05), lr=0.05)


def relu_normal_tiny_lr() -> Setup:
    """R4 under a tiny step: N(0, 1) ReLU weights (exploding at init) and SGD at lr 1e-4."""
    return _digits_setup(lambda: mlp(nn.ReLU, depth=6, width=64, weight_std=1.0), lr=1e-4)


def chaotic_tanh() -> Setup:
    """A 15-layer tanh MLP with sigma_w = 4 (weights N(0, 16/fan_in)): the chaotic phase."""
    return _digits_setup(lambda: mlp(nn.Tanh, depth=15, width=32, weight_std=4 / 32**0.5), lr=0.01)


def expansive_linear() -> Setup:
    """Ten linear layers (no activation) with singular values ~1.6: the gradient grows ~1.6^10."""
    return _digits_setup(
        lambda: mlp(nn.Identity, depth=10, width=64, weight_std=1.6 / 64**0.5), lr=0.01
    )


def exploding_rnn_short() -> Setup:
    """K5 on adding sequences of 5 steps (a repaired RNN learns them in ~100 steps).

    All singular values of W_h are 3.5: the gradient grows ~3.5x per time step.
    """
    return Setup(
        lambda: AddingRNN(radius=3.5, nonlinearity="relu"),
        adding(length=5),
        nn.MSELoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
    )


def healthy_mlp() -> Setup:
    """A He-initialized ReLU MLP at a sensible learning rate: nothing to repair."""
    return _digits_setup(lambda: mlp(nn.ReLU, depth=2, width=64, he=True), lr=0.05)


BROKEN: dict[str, Callable[[], Setup]] = {
    "deep_sigmoid": deep_sigmoid,
    "relu_normal_init": relu_normal_init,
    "dead_relu": dead_relu,
    "exploding_rnn": exploding_rnn,
    "high_lr": high_lr,
}
# The repair benchmark's suite (issue 18): every broken setup above and the harder ones.
SUITE: dict[str, Callable[[], Setup]] = {
    "deep_sigmoid": deep_sigmoid,
    "tiny_init_tanh": tiny_init_tanh,
    "small_init_relu": small_init_relu,
    "relu_normal_tiny_lr": relu_normal_tiny_lr,
    "chaotic_tanh": chaotic_tanh,
    "expansive_linear": expansive_linear,
    "high_lr": high_lr,
    "dead_relu": dead_relu,
    "exploding_rnn": exploding_rnn_short,
}
EXAMPLES: dict[str, Callable[[], Setup]] = {**BROKEN, "healthy_mlp": healthy_mlp}
