"""A suite of healthy and broken setups, each tied to a claim of CLAIMS.md.

Reusable by other tests (detectors, check, repair): ``PREFLIGHT`` cases are
judged by one forward/backward pass (``gradmedic.check``), ``TRAINING`` cases
by a short run under the monitor. ``expected`` is the exact set of problems a
correct diagnosis names (empty: healthy).

Every builder seeds its own generator, so a case is the same model and batch
whatever ran before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradmedic.findings import Problem

Batch = tuple[nn.Module, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Case:
    """One setup: how to build it, which claim it tests, what a diagnosis must say."""

    name: str
    claim: str
    build: Callable[[], Batch]
    expected: frozenset[Problem]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    steps: int = 0

    @property
    def healthy(self) -> bool:
        """Whether a correct diagnosis is empty."""
        return not self.expected


def mlp(
    widths: list[int],
    act: Callable[[], nn.Module],
    init: Callable[[nn.Linear], None] | None = None,
) -> nn.Sequential:
    """Linear layers of ``widths`` with ``act`` between them (none after the last)."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        if init is not None:
            init(lin)
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(act())
    return nn.Sequential(*mods)


def he(lin: nn.Linear) -> None:
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)


def xavier_tanh(lin: nn.Linear) -> None:
    nn.init.xavier_normal_(lin.weight, gain=nn.init.calculate_gain("tanh"))
    nn.init.zeros_(lin.bias)


def normal(std: float, bias: float = 0.0) -> Callable[[nn.Linear], None]:
    def init(lin: nn.Linear) -> None:
        nn.init.normal_(lin.weight, std=std)
        nn.init.constant_(lin.bias, bias)

    return init


def he_bias(bias: float) -> Callable[[nn.Linear], None]:
    def init(lin: nn.Linear) -> None:
        he(lin)
        nn.init.constant_(lin.bias, bias)

    return init


def classification(model: nn.Module, n_in: int, n_classes: int, batch: int = 64) -> Batch:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n_in, generator=gen)
    y = torch.randint(0, n_classes, (batch,), generator=gen)
    return model, x, y


def seeded(fn: Callable[[], Batch]) -> Callable[[], Batch]:
    def build() -> Batch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return fn()

    return build


class ResidualBlock(nn.Module):
    """``x + W2 relu(BN(W1 x))``: identity path plus a normalized branch (R1, R6)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.bn(self.fc1(x))))


def resnet(depth: int, width: int, n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, width),
        *[ResidualBlock(width) for _ in range(depth)],
        nn.LayerNorm(width),
        nn.Linear(width, n_out),
    )


def cnn_bn() -> nn.Sequential:
    mods: list[nn.Module] = []
    c = 3
    for out in (16, 32, 32, 64):
        conv = nn.Conv2d(c, out, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        mods += [conv, nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class NanMaker(nn.Module):
    """A parameterless module that turns its input into NaN (log of a negative)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x - x.abs().max() - 1.0)


def nan_in_middle() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), NanMaker(), nn.Linear(32, 32),
        nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


def images(model: nn.Module) -> Batch:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    return model, x, torch.randint(0, 10, (16,), generator=gen)


V, E, D, S, N, U = (
    Problem.VANISHING,
    Problem.EXPLODING,
    Problem.DEAD_UNITS,
    Problem.SATURATION,
    Problem.NONFINITE,
    Problem.UNSTABLE_UPDATES,
)
H: frozenset[Problem] = frozenset()


def mlp_case(
    name: str,
    claim: str,
    act: Callable[[], nn.Module],
    init: Callable[[nn.Linear], None] | None,
    depth: int,
    width: int,
    expected: frozenset[Problem],
) -> Case:
    """A classification MLP: 64 inputs, ``depth`` Linear layers, 10 classes, batch 64."""
    widths = [64] + [width] * (depth - 1) + [10]
    return Case(
        name, claim, seeded(lambda: classification(mlp(widths, act, init), 64, 10)), expected
    )


PREFLIGHT: list[Case] = [
    # healthy
    mlp_case("he_relu_mlp", "R4", nn.ReLU, he, 11, 128, H),
    mlp_case("he_relu_mlp_deep", "R4", nn.ReLU, he, 41, 64, H),
    mlp_case("he_leaky_mlp", "R2", nn.LeakyReLU, he, 13, 128, H),
    mlp_case("xavier_tanh_mlp", "R4", nn.Tanh, xavier_tanh, 11, 128, H),
    mlp_case("shallow_default_sigmoid", "K7", nn.Sigmoid, None, 2, 128, H),
    Case(
        "residual_bn_mlp", "R1", seeded(lambda: classification(resnet(20, 64, 32, 10), 32, 10)), H
    ),
    Case("conv_bn_he", "R6", seeded(lambda: images(cnn_bn())), H),
    # broken
    mlp_case("sigmoid_deep_default", "K2", nn.Sigmoid, None, 20, 128, frozenset({V})),
    mlp_case("tanh_deep_default", "K3", nn.Tanh, None, 21, 128, frozenset({V})),
    mlp_case("relu_tiny_init", "R4", nn.ReLU, normal(0.01), 11, 128, frozenset({V})),
    mlp_case("relu_huge_init", "R4", nn.ReLU, normal(1.0), 11, 128, frozenset({E})),
    mlp_case("relu_negative_bias", "R3", nn.ReLU, he_bias(-3.0), 7, 128, frozenset({D})),
    mlp_case("sigmoid_saturated", "K2", nn.Sigmoid, normal(1.0), 5, 128, frozenset({S})),
    Case(
        "nan_in_middle",
        "K6",
        seeded(lambda: classification(nan_in_middle(), 16, 4)),
        frozenset({N}),
    ),
]


def training_case(
    name: str, expected: frozenset[Problem], make: Callable[[nn.Module], torch.optim.Optimizer]
) -> Case:
    """A ReLU MLP (32-128-128-128-10, He init) trained 30 steps on one fixed batch."""
    widths = [32, 128, 128, 128, 10]
    build = seeded(lambda: classification(mlp(widths, nn.ReLU, he), 32, 10))
    return Case(name, "K6", build, expected, optimizer=make, steps=30)


TRAINING: list[Case] = [
    training_case("sgd_sane_lr", H, lambda m: torch.optim.SGD(m.parameters(), lr=0.05)),
    training_case("adam_default", H, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
    training_case(
        "sgd_lr_far_too_high", frozenset({U}), lambda m: torch.optim.SGD(m.parameters(), lr=30.0)
    ),
]
