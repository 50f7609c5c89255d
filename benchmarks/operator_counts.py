"""Operators the monitor dispatches per step: a count that machine noise cannot blur.

Run:  python benchmarks/operator_counts.py

Step times on a shared machine swing by several percent between identical
runs; the number of torch operators a configuration adds to a training step
does not. It is counted with a ``TorchDispatchMode`` over steady-state steps
(every operator the step dispatches: the model's, the optimizer's and the
monitor's, on the thread that runs them) and reported as the monitored count
minus the bare one, per step. On CPU each dispatched operator costs a few
microseconds whatever its size, so this is the monitor's fixed cost per step;
its cost per byte is in the timed rows of ``compare.py``.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradmedic
import gradmedic.monitor


class OperatorCount(TorchDispatchMode):
    """Counts every operator dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operators_per_step(
    build: Callable[[], tuple[nn.Module, torch.Tensor]],
    options: dict[str, Any] | None,
    steps: int = 20,
    warmup: int = 3,
) -> collections.Counter[str]:
    """Operators dispatched over ``steps`` SGD steps after ``warmup`` (``options=None``: bare).

    Steady state: the monitor's early phase (every update measured) is switched off
    while it runs, as in ``compare.py``.
    """
    torch.manual_seed(0)
    model, x = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            opt.step()

    early, gradmedic.monitor.EARLY_UPDATES = gradmedic.monitor.EARLY_UPDATES, 0
    try:
        watched = gradmedic.watch(model, opt, **options) if options is not None else None
        with watched if watched is not None else contextlib.nullcontext():
            train(warmup)
            with OperatorCount() as count:
                train(steps)
    finally:
        gradmedic.monitor.EARLY_UPDATES = early
    return count.counts


def total_per_step(
    build: Callable[[], tuple[nn.Module, torch.Tensor]],
    options: dict[str, Any] | None,
    steps: int = 20,
) -> float:
    """All operators of one steady-state step, averaged over ``steps`` (None: bare).

    20 steps hold one step of each probe sampled one step in 20 (the default's
    activation and recurrent probes), so their share is counted once.
    """
    return sum(operators_per_step(build, options, steps).values()) / steps


def extra_per_step(
    build: Callable[[], tuple[nn.Module, torch.Tensor]], options: dict[str, Any], steps: int = 20
) -> float:
    """Operators ``watch(**options)`` adds to one steady-state step."""
    return total_per_step(build, options, steps) - total_per_step(build, None, steps)


#: The monitor configurations counted here and timed by ``compare.py``.
CONFIGS: dict[str, dict[str, Any]] = {
    "norms only": {"deltas": False, "updates": False, "activations": False, "recurrent": False},
    "default `watch()`": {},
    "everything every step": {"activations": True, "recurrent": True, "update_every": 1},
}


def table(models: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]) -> str:
    """A markdown table: extra operators per step, one column per model."""
    lines = [
        "| operators added per step | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    bare = {title: total_per_step(build, None) for title, build in models.items()}
    for label, options in CONFIGS.items():
        extra = [total_per_step(build, options) - bare[t] for t, build in models.items()]
        lines.append(f"| {label} | " + " | ".join(f"{n:.0f}" for n in extra) + " |")
    return "\n".join(lines)


def main() -> None:
    import compare

    torch.set_num_threads(1)
    print(table(compare.counted_models()))


if __name__ == "__main__":
    main()
