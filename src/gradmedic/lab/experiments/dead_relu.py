"""R3: dead ReLU units get zero gradient and stay dead; Leaky ReLU gives them a way back."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "dead_relu"
TITLE = "Dead ReLU units stay dead; Leaky ReLU lets them recover"
WIDTH = 64
KILLED = 32  # the first KILLED hidden units are killed
MARGIN = 0.5
SLOPE = 0.01
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}
ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(SLOPE),
}


def killed_net(act: str, x: torch.Tensor, seed: int) -> nn.Sequential:
    """``features -> 64 -> 10`` whose first ``KILLED`` hidden units are dead on every input.

    Their biases are lowered so that the largest pre-activation over ``x`` is ``-MARGIN``:
    the state a large negative bias learned by a bad step leaves behind. The weights are
    the same for both activations (same seed).
    """
    torch.manual_seed(seed)
    model = _nets.mlp([x.shape[1], WIDTH, 10], ACTS[act])
    with torch.no_grad():
        first = cast(nn.Linear, model[0])
        top = first(x).max(dim=0).values
        first.bias[:KILLED] -= top[:KILLED] + MARGIN
    return model


def alive(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Per hidden unit: is its pre-activation positive for at least one input of ``x``?"""
    with torch.no_grad():
        return (model[0](x) > 0).any(dim=0)


def dead_run(act: str, opt_name: str, dataset: data.Dataset, steps: int, seed: int) -> dict:
    """Train a killed net; the killed units' first gradient, revivals, deaths, accuracy."""
    x = dataset.x_train
    model = killed_net(act, x, seed)
    first: dict[str, float] = {}

    def on_step(step: int) -> None:
        if step == 0:
            g = cast(torch.Tensor, model[0].weight.grad)
            first["killed"] = float(g[:KILLED].abs().max())
            first["healthy"] = float(g[KILLED:].abs().max())

    healthy_before = int(alive(model, x)[KILLED:].sum())
    opt = OPTIMIZERS[opt_name](model.parameters())
    curves = train(model, dataset, opt, steps=steps, batch_size=128, seed=seed, on_step=on_step)
    after = alive(model, x)
    return {
        "first_grad_max_killed": first["killed"],
        "first_grad_max_healthy": first["healthy"],
        "revived": int(after[:KILLED].sum()),
        "healthy_alive_before": healthy_before,
        "healthy_alive_after": int(after[KILLED:].sum()),
        "test_accuracy": curves.final_accuracy,
        "loss": curves.loss,
    }


@experiment(NAME, ["R3"], TITLE)
def run(config: LabConfig) -> Result:
    steps = config.pick(150, 1000)
    dataset = data.digits(config.seed)
    seeds = stats.comparison_seeds(config)
    names = [f"{act}_{opt}" for act in ACTS for opt in OPTIMIZERS]
    per_seed = [
        {
            f"{act}_{opt}": dead_run(act, opt, dataset, steps, s)
            for act in ACTS
            for opt in OPTIMIZERS
        }
        for s in seeds
    ]

    def every(name: str, key: str) -> list[float]:
        return [float(r[name][key]) for r in per_seed]

    half = KILLED // 2
    relu = [f"relu_{o}" for o in OPTIMIZERS]
    leaky = [f"leaky_relu_{o}" for o in OPTIMIZERS]
    checks = {
        "ReLU: the killed units' incoming weights get exactly zero gradient, every seed": all(
            v == 0.0 for n in relu for v in every(n, "first_grad_max_killed")
        ),
        "ReLU: no killed unit revives (SGD and Adam), every seed": all(
            v == 0 for n in relu for v in every(n, "revived")
        ),
        "Leaky ReLU: the killed units get a nonzero gradient, every seed": all(
            v > 0 for n in leaky for v in every(n, "first_grad_max_killed")
        ),
    }
    for opt, label in (("sgd", "SGD"), ("adam", "Adam")):
        checks[
            f"Leaky ReLU + {label}: at least {half} of {KILLED} killed units revive, every seed"
        ] = min(every(f"leaky_relu_{opt}", "revived")) >= half
    verdict = judge(checks)

    fig, (ax, ax_h) = plotting.figure(2, width=4.2)
    plotting.grouped_bars(
        ax,
        names,
        {
            "revived": [[r[n]["revived"] for n in names] for r in per_seed],
            "still dead": [[KILLED - r[n]["revived"] for n in names] for r in per_seed],
        },
    )
    ax.set_ylim(0, KILLED * 1.05)
    ax.tick_params(axis="x", rotation=15)
    plotting.label(ax, f"the {KILLED} killed units after {steps} steps", "", "units")
    healthy = WIDTH - KILLED
    plotting.grouped_bars(
        ax_h,
        names,
        {
            "before training": [
                [r[n]["healthy_alive_before"] / healthy for n in names] for r in per_seed
            ],
            "after": [[r[n]["healthy_alive_after"] / healthy for n in names] for r in per_seed],
        },
    )
    ax_h.set_ylim(0, 1.05)
    ax_h.tick_params(axis="x", rotation=15)
    plotting.label(ax_h, f"the {healthy} other units: share alive", "", "share alive")
    revived = {n: stats.summary(every(n, "revived")) for n in names}

    return Result(
        setup=(
            f"Digits; {dataset.n_features}-{WIDTH}-10 MLP (PyTorch default init). The biases of "
            f"{KILLED} of the {WIDTH} hidden units are lowered until their largest "
            f"pre-activation over the training set is -{MARGIN} (dead on every input, as after "
            f"a large negative bias was learned). The same weights with ReLU and with Leaky ReLU "
            f"(slope {SLOPE}), each trained with SGD (lr 0.1) and with Adam (lr 0.01), batch "
            f"128, {steps} steps, random seeds {seeds}. A unit is alive if its pre-activation "
            "is positive for at least one training input."
        ),
        expected=(
            "A dead ReLU gets zero gradient for all its incoming weights and never recovers; a "
            "Leaky ReLU passes a small gradient and gives the unit a way back."
        ),
        numbers={
            "steps": steps,
            "killed": KILLED,
            "seeds": seeds,
            "revived": revived,
            "first_grad_max_killed": {n: every(n, "first_grad_max_killed") for n in names},
            "first_grad_max_healthy": {n: every(n, "first_grad_max_healthy") for n in names},
            "healthy_units_died": {
                n: [r[n]["healthy_alive_before"] - r[n]["healthy_alive_after"] for r in per_seed]
                for n in names
            },
            "test_accuracy": {n: stats.summary(every(n, "test_accuracy")) for n in names},
            "checks": checks,
        },
        rule=(
            f"Fixed before the run: each check must hold in every one of the {len(seeds)} "
            "seeds (a seed draws the weights and the batches). Holds if all checks in "
            "numbers.checks pass, partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Over {len(seeds)} seeds. Largest first-step gradient on a killed unit's weights: "
            f"ReLU {max(every('relu_sgd', 'first_grad_max_killed')):.3g}, Leaky ReLU "
            f"{min(every('leaky_relu_sgd', 'first_grad_max_killed')):.3g} or more (healthy "
            f"units: {statistics.fmean(every('leaky_relu_sgd', 'first_grad_max_healthy')):.3g}"
            "). Killed units revived (mean, min..max): "
            + ", ".join(
                f"{n} {v['mean']:.1f} ({min(v['values']):g}..{max(v['values']):g})/{KILLED}"
                for n, v in revived.items()
            )
            + ". The Leaky ReLU's way back is "
            f"{SLOPE:g} times the gradient an active unit would get; plain SGD scales the step "
            "by it, Adam divides it out (its step depends on the gradient's sign and history, "
            "not its size), so whether the units come back depends on the optimizer."
            + stats.seed_note(config, seeds)
        ),
        figures={"revived_and_died": fig},
    )
