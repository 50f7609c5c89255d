"""R4: training a 10-layer tanh and ReLU net under four initializations."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets

NAME = "init_schemes"
TITLE = "Training under N(0, 0.01^2), N(0, 1), Xavier and He initialization (tanh, ReLU)"
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}
MATCHED = {"tanh": "xavier", "relu": "he"}
INITS = ("small", "normal", "xavier", "he")
STD = {"small": 0.01, "normal": 1.0}
LR = 0.05
MOMENTUM = 0.9
MARGIN = 0.05  # nats of training loss: the smallest difference that counts


def build(act: str, init: str, sizes: list[int]) -> nn.Sequential:
    """The net with ``init``: fixed-std normals, or gradmedic.init.apply for Xavier/He."""
    if init in STD:
        return _nets.mlp(sizes, ACTS[act], std=STD[init])
    return _nets.mlp(sizes, ACTS[act], init=init)


def init_run(act: str, init: str, dataset: data.Dataset, depth: int, steps: int, seed: int) -> dict:
    """Step-0 gradient profile (gradmedic.watch) and training curve of one (act, init)."""
    torch.manual_seed(seed)
    model = build(act, init, [dataset.n_features, *[64] * depth, 10])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    curves, grads = _nets.train_profiled(
        model, dataset, opt, steps=steps, batch_size=128, seed=seed
    )
    return {
        "grad_profile": grads,
        "first_over_last": grads[0] / grads[-1] if grads[-1] > 0 else math.nan,
        "loss": curves.loss,
        "diverged": curves.diverged,
        "final_loss": _nets.final_loss(curves, steps),
        "test_accuracy": curves.final_accuracy,
    }


def lower(good: list[float], bad: list[float]) -> tuple[bool, dict]:
    """``good`` below ``bad`` beyond the margin and the seeds' spread, or ``bad`` diverged.

    A diverged run has an infinite loss: the good init wins against it when it did not
    diverge itself in any seed, and every seed of the bad one diverged.
    """
    if all(math.isinf(v) for v in bad) and all(math.isfinite(v) for v in good):
        return True, {"outcome": "bad init diverged in every seed"}
    cmp = stats.compare(bad, good, margin=MARGIN)
    return cmp["outcome"] == "a > b", cmp


@experiment(NAME, ["R4"], TITLE)
def run(config: LabConfig) -> Result:
    depth = 10
    steps = config.pick(50, 500)
    dataset = data.digits(config.seed)
    seeds = stats.comparison_seeds(config)
    runs = {
        act: {
            init: [init_run(act, init, dataset, depth, steps, s) for s in seeds] for init in INITS
        }
        for act in ACTS
    }
    losses = {a: {i: stats.each(r, "final_loss") for i, r in v.items()} for a, v in runs.items()}
    ratios = {
        a: {i: stats.each(r, "first_over_last") for i, r in v.items()} for a, v in runs.items()
    }
    loss = {a: {i: _mean(v) for i, v in d.items()} for a, d in losses.items()}
    ratio = {a: {i: _mean(v) for i, v in d.items()} for a, d in ratios.items()}
    checks, cmp = {}, {}
    for act, init in MATCHED.items():
        checks[f"{act} + {init}: first/last-layer gradient ratio within 10x of 1 in every seed"] = (
            all(0.1 <= v <= 10 for v in ratios[act][init])
        )
        wins = {}
        for bad in STD:
            wins[bad], cmp[f"{act}_{bad}_minus_{init}"] = lower(losses[act][init], losses[act][bad])
        checks[
            f"{act} + {init}: lower final loss than N(0, 0.01^2) and N(0, 1) (by more than "
            f"{MARGIN:g} and the seeds' spread, or they diverged)"
        ] = all(wins.values())
    verdict = judge(checks)

    fig, axes = plotting.figure(2, width=4.2)
    for ax, act in zip(axes, ACTS, strict=True):
        plotting.seed_runs_on_scale(
            ax,
            {init: [r["loss"] for r in runs[act][init]] for init in INITS},
            diverged={init: [r["diverged"] for r in runs[act][init]] for init in INITS},
        )
        plotting.label(ax, f"{act}: training loss", "SGD step", "cross-entropy")

    def fmt(v: float) -> str:
        return "diverged" if math.isinf(v) else f"{v:.3f}"

    return Result(
        setup=(
            f"Digits; MLP {dataset.n_features}-64x{depth}-10 with tanh or ReLU; weights "
            "N(0, 0.01^2) ('small'), N(0, 1) ('normal'), Xavier (gradmedic.init.apply(model, "
            "'xavier'): variance 2/(fan_in + fan_out)) or He (gradmedic.init.apply(model, 'he'): "
            f"variance gain^2/fan_in), biases 0; SGD lr {LR}, momentum {MOMENTUM}, batch 128, "
            f"{steps} steps, random seeds {seeds} (same batches for every init of a seed). The "
            "gradient-profile grid over activations and inits "
            "with its mean-field prediction is the depth_profiles experiment."
        ),
        expected=(
            "Xavier (for tanh) and He (for ReLU) keep the signal and the gradient at the same "
            "size across layers, so these nets train where too small or too large a fixed "
            "standard deviation does not."
        ),
        numbers={
            "depth": depth,
            "steps": steps,
            "seeds": seeds,
            "final_loss": {
                a: {i: stats.summary(v) for i, v in d.items()} for a, d in losses.items()
            },
            "first_over_last": {
                a: {i: stats.summary(v) for i, v in d.items()} for a, d in ratios.items()
            },
            "comparisons": cmp,
            "test_accuracy": {
                a: {i: stats.summary(stats.each(r, "test_accuracy")) for i, r in v.items()}
                for a, v in runs.items()
            },
            "runs": runs,
            "checks": checks,
        },
        rule=(
            "Fixed before the run: first_over_last = ||dL/dW_1|| / ||dL/dW_last|| at step 0; "
            "final_loss = mean training loss over the last 10% of steps (infinite if training "
            f"diverged). Over {len(seeds)} seeds (paired by seed) a loss is lower when the mean "
            f"difference exceeds {MARGIN:g} and twice its standard error, or when the other "
            "init diverged in every seed. Holds if all checks in numbers.checks pass, partly if "
            "some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Means over {len(seeds)} seeds. Final loss by init: "
            + "; ".join(
                f"{a}: " + ", ".join(f"{i} {fmt(v)}" for i, v in d.items()) for a, d in loss.items()
            )
            + ". First/last-layer gradient ratio at step 0: "
            + "; ".join(
                f"{a}: " + ", ".join(f"{i} {v:.2g}" for i, v in d.items()) for a, d in ratio.items()
            )
            + ". Too small a standard deviation shrinks the signal and the gradient at every "
            "layer; N(0, 1) with 64 inputs per unit multiplies the pre-activations by about 8 "
            "per layer, which saturates tanh and blows up ReLU." + stats.seed_note(config, seeds)
        ),
        figures={"training": fig},
    )


def _mean(values: list[float]) -> float:
    """The mean, infinite when any value is (a run that diverged)."""
    return math.inf if any(math.isinf(v) for v in values) else statistics.fmean(values)
