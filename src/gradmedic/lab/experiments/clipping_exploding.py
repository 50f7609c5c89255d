"""R7: clipping by norm and by value on an exploding ReLU net: diverges without, trains with."""

from __future__ import annotations

import math
import statistics
from typing import cast

import torch
from torch import nn

import gradmedic
from gradmedic.lab import data, plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "clipping_exploding"
TITLE = "Gradient clipping by norm and by value on an exploding net"
GAIN = 2.0  # weights N(0, GAIN^2 / fan_in): twice He's standard deviation
LR = 0.1
THRESHOLD = 1.0
CHANCE = math.log(10)


def clip_run(mode: str, dataset: data.Dataset, depth: int, steps: int, seed: int) -> dict:
    """Train one copy of the exploding net, clipping with ``mode`` ('none', 'norm', 'value').

    After each clip the largest post-clip global norm and element are kept, to check the
    clipping against its own definition.
    """
    torch.manual_seed(seed)
    model = _nets.mlp([dataset.n_features, *[64] * depth, 10], nn.ReLU, gain=GAIN)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params = list(model.parameters())
    after_norm: list[float] = []
    after_max: list[float] = []

    def clip(step: int) -> None:
        if mode == "norm":
            gradmedic.clip_grad_norm_(params, THRESHOLD)
        elif mode == "value":
            gradmedic.clip_grad_value_(params, THRESHOLD)
        grads = [cast(torch.Tensor, p.grad) for p in params]
        after_norm.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        after_max.append(max(float(g.abs().max()) for g in grads))

    curves = train(model, dataset, opt, steps=steps, batch_size=128, seed=seed, on_step=clip)
    finite = [v for v in after_norm if math.isfinite(v)]
    return {
        "loss": curves.loss,
        "grad_norm_before_clip": curves.grad_norm,
        "grad_norm_after_clip": after_norm,
        "param_norm": curves.param_norm,
        "max_after_norm": max(finite) if finite else math.nan,
        "max_after_element": max(after_max),
        "diverged": curves.diverged,
        "steps_run": len(curves.loss),
        "final_loss": statistics.fmean(curves.loss[-max(1, steps // 10) :]),
        "test_accuracy": curves.final_accuracy,
    }


@experiment(NAME, ["R7"], TITLE)
def run(config: LabConfig) -> Result:
    depth = 8
    steps = config.pick(100, 600)
    dataset = data.digits(config.seed)
    runs = {m: clip_run(m, dataset, depth, steps, config.seed) for m in ("none", "norm", "value")}
    none, norm, value = runs["none"], runs["norm"], runs["value"]
    checks = {
        "without clipping: training diverges (non-finite loss)": none["diverged"],
        "clipped by norm: finite and below chance loss ln 10": (
            not norm["diverged"] and norm["final_loss"] < CHANCE
        ),
        "clipped by value: finite and below chance loss ln 10": (
            not value["diverged"] and value["final_loss"] < CHANCE
        ),
        f"every norm-clipped gradient has global norm <= {THRESHOLD:g}": (
            norm["max_after_norm"] <= THRESHOLD * (1 + 1e-5)
        ),
        f"every value-clipped gradient element is within +-{THRESHOLD:g}": (
            value["max_after_element"] <= THRESHOLD
        ),
    }
    verdict = judge(checks)

    fig, (ax_l, ax_g) = plotting.figure(2, width=4.2)
    plotting.runs_on_scale(
        ax_l,
        {f"clip: {mode}": r["loss"] for mode, r in runs.items()},
        diverged={f"clip: {mode}": r["diverged"] for mode, r in runs.items()},
    )
    for k, (mode, r) in enumerate(runs.items()):
        x = range(1, len(r["loss"]) + 1)
        plotting.profile(
            ax_g, x, r["grad_norm_before_clip"], label=f"{mode}: before clipping", color=f"C{k}"
        )
        if mode != "none":
            plotting.profile(
                ax_g,
                x,
                r["grad_norm_after_clip"],
                label=f"{mode}: after clipping",
                predicted=True,
                color=f"C{k}",
            )
    ax_g.axhline(THRESHOLD, color="gray", linestyle=":", label="threshold")
    plotting.label(ax_l, "training loss", "SGD step", "cross-entropy")
    plotting.label(ax_g, "global gradient norm (dashed: after clipping)", "SGD step", "||g||")

    return Result(
        name=NAME,
        claims=["R7"],
        title=TITLE,
        setup=(
            f"Digits; ReLU MLP with {depth} hidden layers of 64, weights N(0, {GAIN:g}^2/fan_in) "
            f"(twice He's standard deviation, so the forward signal and the gradient grow by "
            f"about sqrt({GAIN:g}^2/2) = {GAIN / math.sqrt(2):.2f} per layer), biases 0; SGD lr "
            f"{LR}, batch 128, {steps} steps. Three runs from the same weights and batches: no "
            f"clipping; gradmedic.clip_grad_norm_(max_norm={THRESHOLD:g}); "
            f"gradmedic.clip_grad_value_(clip_value={THRESHOLD:g})."
        ),
        expected=(
            "Without clipping the exploding gradients make SGD diverge; clipping by global norm "
            "(g <- threshold / ||g|| g) or by value (each element into [-t, t]) bounds each step "
            "and training proceeds."
        ),
        numbers={
            "depth": depth,
            "steps": steps,
            "threshold": THRESHOLD,
            "first_grad_norm": none["grad_norm_before_clip"][0],
            "diverged": {m: r["diverged"] for m, r in runs.items()},
            "steps_run": {m: r["steps_run"] for m, r in runs.items()},
            "final_loss": {m: r["final_loss"] for m, r in runs.items()},
            "test_accuracy": {m: r["test_accuracy"] for m, r in runs.items()},
            "max_norm_after_clip": norm["max_after_norm"],
            "max_element_after_clip": value["max_after_element"],
            "runs": runs,
            "checks": checks,
        },
        rule=(
            "final_loss = mean training loss over the last 10% of steps; diverged = a non-finite "
            "loss occurred. Holds if all checks in numbers.checks pass, partly if some do, does "
            "not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"The first gradient has global norm {none['grad_norm_before_clip'][0]:.3g}. Without "
            + (
                f"clipping the loss became non-finite at step {none['steps_run']}"
                if none["diverged"]
                else f"clipping training stayed finite (final loss {none['final_loss']:.3f})"
            )
            + f"; clipped by norm: final loss {norm['final_loss']:.3f}, test accuracy "
            f"{norm['test_accuracy']:.3f}; clipped by value: final loss {value['final_loss']:.3f}, "
            f"test accuracy {value['test_accuracy']:.3f}. Largest global norm after norm "
            f"clipping {norm['max_after_norm']:.6g}; largest element after value clipping "
            f"{value['max_after_element']:.6g}. Parameter norm after the first and the last "
            f"step: clipped by norm {norm['param_norm'][0]:.1f} -> {norm['param_norm'][-1]:.1f}, "
            f"by value {value['param_norm'][0]:.1f} -> {value['param_norm'][-1]:.1f}. Clipping "
            "does not remove the cause (the initialization amplifies); it bounds each step, so "
            "SGD cannot overshoot into the region where the loss and gradients blow up."
        ),
        figures={"loss_and_norms": fig},
    )
