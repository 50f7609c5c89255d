"""The trainability grid: does a net train, and did the preflight say so?

Schoenholz et al. (2017)-style: tanh MLPs of width 128 on the digits data,
weights ``N(0, sigma_w^2 / fan_in)``, biases ``N(0, sigma_b^2)``, trained by
SGD; a cell *trains* when its test accuracy after training is >= 0.5. Per cell
it records the outcome under each optimizer, the depth-scale rule (trains iff
``depth <= 6 xi_c``), and :func:`gradmedic.check` without and with the
optimizer (a prediction "trains" is a healthy diagnosis). Used by
``benchmarks/trainability_grid.py`` and the tests.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: The optimizers of the grid: name -> factory params -> Optimizer.
OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.01),
    "momentum": functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
}


def tanh_mlp(
    depth: int, sw2: float, sb2: float = 0.05, width: int = 128, seed: int = 0
) -> nn.Sequential:
    """``depth`` tanh layers of ``width`` (64 digits features in, 10 classes out)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [64] + [width] * depth + [10]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layer = nn.Linear(a, b)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(b, a, generator=gen) * math.sqrt(sw2 / a))
            layer.bias.copy_(torch.randn(b, generator=gen) * math.sqrt(sb2))
        mods.append(layer)
        if i < depth:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def depth_rule(depth: int, sw2: float, sb2: float = 0.05) -> bool:
    """Schoenholz et al.'s rule: trainable iff ``depth <= 6 xi_c``."""
    from gradmedic.theory.meanfield import depth_scale

    xi = depth_scale("tanh", math.sqrt(sw2), math.sqrt(sb2)).xi_c
    return not math.isfinite(xi) or depth <= 6 * xi


@dataclass
class Cell:
    """One grid cell's outcomes and predictions (True: trains / predicted to train)."""

    depth: int
    sw2: float
    accuracy: dict[str, float] = field(default_factory=dict)
    depth_rule: bool = True
    check: bool = True
    check_with: dict[str, bool] = field(default_factory=dict)
    step_size: dict[str, dict[str, Any]] = field(default_factory=dict)

    def trains(self, name: str) -> bool:
        """Whether the net reached test accuracy >= 0.5 under optimizer ``name``."""
        return self.accuracy[name] >= 0.5


def train_cell(
    depth: int, sw2: float, *, steps: int = 400, sb2: float = 0.05, seed: int = 0
) -> dict[str, list[tuple[int, float]]]:
    """Train the cell under each optimizer of :data:`OPTIMIZERS` (batch 64).

    Returns:
        ``{optimizer: [(step, test accuracy), ...]}``, evaluated every 50 steps and
        at the end; a run whose loss became non-finite ends with accuracy 0.
    """
    from gradmedic.lab.data import digits
    from gradmedic.lab.train import train

    data = digits(seed)
    model = tanh_mlp(depth, sw2, sb2, seed=seed)
    out: dict[str, list[tuple[int, float]]] = {}
    for name, factory in OPTIMIZERS.items():
        net = copy.deepcopy(model)
        curves = train(net, data, factory(net.parameters()), steps=steps, seed=seed, eval_every=50)
        out[name] = list(curves.test_accuracy) + (
            [(len(curves.loss), 0.0)] if curves.diverged else []
        )
    return out


def run_cell(
    depth: int,
    sw2: float,
    *,
    steps: int = 400,
    sb2: float = 0.05,
    check_batch: int = 256,
    seed: int = 0,
    outcomes: Mapping[str, float] | None = None,
) -> Cell:
    """The cell's predictions, and its outcome under each optimizer of :data:`OPTIMIZERS`.

    ``outcomes`` (``{optimizer: final test accuracy}``, from :func:`train_cell` of
    the same cell and seed) skips the training; otherwise the cell is trained.
    """
    from gradmedic.lab.data import digits
    from gradmedic.preflight import check

    data = digits(seed)
    model = tanh_mlp(depth, sw2, sb2, seed=seed)
    xb, yb = data.x_train[:check_batch], data.y_train[:check_batch]
    cell = Cell(depth, sw2, depth_rule=depth_rule(depth, sw2, sb2))
    cell.check = check(model, xb, yb).healthy
    for name, factory in OPTIMIZERS.items():
        diagnosis = check(model, xb, yb, optimizer=factory)
        cell.check_with[name] = diagnosis.healthy
        cell.step_size[name] = diagnosis.context.get("step_size", {})
    if outcomes is None:
        curves = train_cell(depth, sw2, steps=steps, sb2=sb2, seed=seed)
        outcomes = {name: curve[-1][1] for name, curve in curves.items()}
    cell.accuracy = {name: float(outcomes[name]) for name in OPTIMIZERS}
    return cell


def agreement(cells: Sequence[Cell], name: str, predictor: str) -> float:
    """Share of ``cells`` where ``predictor`` (``depth_rule``/``check``/``check_with``) is right."""
    if not cells:
        return math.nan
    return sum(_predicted(c, name, predictor) == c.trains(name) for c in cells) / len(cells)


def false_alarms(cells: Sequence[Cell], name: str, predictor: str) -> int:
    """Cells that train under ``name`` but ``predictor`` says they will not."""
    return sum(c.trains(name) and not _predicted(c, name, predictor) for c in cells)


def _predicted(cell: Cell, name: str, predictor: str) -> bool:
    if predictor == "check_with":
        return cell.check_with[name]
    return bool(getattr(cell, predictor))
