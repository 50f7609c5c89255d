"""K6: too large a learning rate inflates parameters and gradients; too small barely moves."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge_claims
from gradmedic.lab.train import train

RUNS = {  # name: (optimizer, learning rate)
    "SGD lr 3 (too large)": ("sgd", 3.0),
    "SGD lr 1e-1": ("sgd", 0.1),
    "SGD lr 1e-4 (too small)": ("sgd", 1e-4),
    "Adam lr 1e-3": ("adam", 1e-3),
    "Adam lr 1e-2": ("adam", 1e-2),
    "Adam lr 1e-1": ("adam", 1e-1),
}
LARGE, GOOD, SMALL, ADAM = list(RUNS)[:4]


def one_run(ds: data.Dataset, optimizer: str, lr: float, steps: int, seed: int) -> dict:
    """Train the same 64-64-64-10 ReLU MLP (same init) with one optimizer and learning rate."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(ds.n_features, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, ds.n_classes),
    )
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    curves = train(model, ds, opt_cls(model.parameters(), lr=lr), steps=steps, seed=seed)
    end = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    loss = curves.loss
    return {
        "optimizer": optimizer,
        "lr": lr,
        "loss": loss,
        "param_norm": curves.param_norm,
        "grad_norm": curves.grad_norm,
        "initial_loss": loss[0],
        "final_loss": loss[-1],
        "param_growth": _ratio(max(curves.param_norm), float(start.norm())),
        "grad_growth": _ratio(max(curves.grad_norm), curves.grad_norm[0]),
        "param_movement": _ratio(float((end - start).norm()), float(start.norm())),
        "test_accuracy": curves.final_accuracy,
        "nonfinite": curves.diverged or not math.isfinite(max(curves.param_norm)),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) else math.inf


@experiment(
    "lr_divergence", ["K6"], "Learning rate: too large diverges, too small stalls, Adam adapts"
)
def run(config: LabConfig) -> Result:
    steps = config.pick(200, 1000)
    ds = data.load(config.seed, config.mnist_dir)
    if config.quick and ds.name == "mnist":
        ds = ds.subset(5000, 2000)
    seeds = stats.comparison_seeds(config)
    per_seed = [
        {name: one_run(ds, opt, lr, steps, s) for name, (opt, lr) in RUNS.items()} for s in seeds
    ]
    runs = {name: [r[name] for r in per_seed] for name in RUNS}
    large, good, small, adam = (runs[k] for k in (LARGE, GOOD, SMALL, ADAM))

    def fails(r: dict) -> bool:
        return r["nonfinite"] or not r["final_loss"] < 0.9 * r["initial_loss"]

    def trains(r: dict) -> bool:
        return not r["nonfinite"] and r["final_loss"] < 0.2 * r["initial_loss"]

    def stalls(r: dict) -> bool:
        return r["final_loss"] > 0.95 * r["initial_loss"] and r["param_movement"] < 0.01

    checks = {
        "K6": {
            "too large: training fails (final loss >= 0.9 x initial, or non-finite), every "
            "seed": all(map(fails, large)),
            "too large: parameter norm grows >= 10x, every seed": all(
                r["param_growth"] >= 10 for r in large
            ),
            "too large: gradient norm grows >= 10x, every seed": all(
                r["grad_growth"] >= 10 for r in large
            ),
            "too small: loss drops < 5% and parameters move < 1%, every seed": all(
                map(stalls, small)
            ),
            "a moderate SGD step trains (final loss < 0.2 x initial), every seed": all(
                map(trains, good)
            ),
            "Adam at its default lr 1e-3 trains with no tuning, every seed": all(map(trains, adam)),
        }
    }
    verdict, per_claim = judge_claims(checks)

    fig, axes = plotting.figure(3, width=4.2)
    for ax, key, title in zip(
        axes,
        ("loss", "param_norm", "grad_norm"),
        ("training loss", "||theta||", "||gradient||"),
        strict=True,
    ):
        plotting.seed_runs_on_scale(
            ax,
            {name: [r[key] for r in rs] for name, rs in runs.items()},
            diverged={name: [r["nonfinite"] for r in rs] for name, rs in runs.items()},
        )
        plotting.label(ax, title, "step", title, legend=key == "loss")

    summary = {
        name: [{k: r[k] for k in r if k not in ("loss", "param_norm", "grad_norm")} for r in rs]
        for name, rs in runs.items()
    }

    def mean(rs: list[dict], key: str) -> float:
        return statistics.fmean(stats.each(rs, key))

    return Result(
        name="lr_divergence",
        claims=["K6"],
        title="Learning rate: too large diverges, too small stalls, Adam adapts",
        setup=(
            f"{ds.name}: the same 64-64-64-10 ReLU MLP (same init, same batches of 64) trained "
            f"for {steps} steps with cross-entropy by " + ", ".join(RUNS) + f", random seeds "
            f"{seeds} (a seed draws the init and the batches). Recorded at each step: loss, "
            "global parameter norm, global gradient norm."
        ),
        expected=(
            "Too large a step overshoots, inflates the parameters and so the gradients, and "
            "training diverges; too small a step barely moves; an adaptive method copes."
        ),
        numbers={
            "steps": steps,
            "seeds": seeds,
            "runs": summary,
            "curves": runs,
            "checks": checks,
        },
        rule=(
            "From runs.*: too large fails (final_loss >= 0.9 initial_loss or non-finite), with "
            "param_growth = max ||theta|| / ||theta_0|| >= 10 and grad_growth = max ||g|| / "
            "||g_0|| >= 10; too small has final_loss > 0.95 initial_loss and param_movement = "
            "||theta_T - theta_0|| / ||theta_0|| < 0.01; SGD lr 0.1 and Adam lr 1e-3 train "
            "(final_loss < 0.2 initial_loss). Fixed before the run; each check must hold in every "
            f"one of the {len(seeds)} seeds. All checks pass: holds; some: holds partly; none: "
            "does not hold."
        ),
        verdict=verdict,
        per_claim=per_claim,
        explanation=(
            f"Means over {len(seeds)} seeds. SGD lr 3: parameter norm "
            f"x{mean(large, 'param_growth'):.3g}, gradient norm x{mean(large, 'grad_growth'):.3g},"
            f" final loss {mean(large, 'final_loss'):.3g} (from {mean(large, 'initial_loss'):.3g})"
            f", accuracy {mean(large, 'test_accuracy'):.0%}. SGD lr 1e-4: loss "
            f"{mean(small, 'initial_loss'):.3g} -> {mean(small, 'final_loss'):.3g}, parameters "
            f"moved {mean(small, 'param_movement'):.2%}. SGD lr 0.1 reaches accuracy "
            f"{mean(good, 'test_accuracy'):.0%}; Adam lr 1e-3 {mean(adam, 'test_accuracy'):.0%}, "
            f"lr 1e-2 {mean(runs['Adam lr 1e-2'], 'test_accuracy'):.0%}, lr 1e-1 "
            f"{mean(runs['Adam lr 1e-1'], 'test_accuracy'):.0%}. Adam divides each step by the "
            "running RMS of the gradient, so its step size does not grow with the gradient; it "
            "tolerates a wider range of learning rates than SGD but is not immune to a very "
            "large one." + stats.seed_note(config, seeds)
        ),
        figures={"curves": fig},
    )
