"""R7: clipping by norm and by value on an exploding ReLU net: diverges without, trains with."""

from __future__ import annotations

import math
import statistics
from typing import cast

import torch
from torch import nn

import gradmedic
from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "clipping_exploding"
TITLE = "Gradient clipping by norm and by value on an exploding net"
GAIN = 2.0  # weights N(0, GAIN^2 / fan_in): twice He's standard deviation
LR = 0.1
THRESHOLD = 1.0
CHANCE = math.log(10)
MODES = ("none", "norm", "value")


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
    seeds = stats.comparison_seeds(config)
    runs = {m: [clip_run(m, dataset, depth, steps, s) for s in seeds] for m in MODES}
    none, norm, value = runs["none"], runs["norm"], runs["value"]

    def trains(rs: list[dict]) -> bool:
        return all(not r["diverged"] and r["final_loss"] < CHANCE for r in rs)

    checks = {
        "without clipping: training diverges (non-finite loss) in every seed": all(
            r["diverged"] for r in none
        ),
        "clipped by norm: finite and below chance loss ln 10 in every seed": trains(norm),
        "clipped by value: finite and below chance loss ln 10 in every seed": trains(value),
        f"every norm-clipped gradient has global norm <= {THRESHOLD:g}": all(
            r["max_after_norm"] <= THRESHOLD * (1 + 1e-5) for r in norm
        ),
        f"every value-clipped gradient element is within +-{THRESHOLD:g}": all(
            r["max_after_element"] <= THRESHOLD for r in value
        ),
    }
    verdict = judge(checks)

    fig, (ax_l, ax_g) = plotting.figure(2, width=4.2)
    plotting.seed_runs_on_scale(
        ax_l,
        {f"clip: {mode}": [r["loss"] for r in rs] for mode, rs in runs.items()},
        diverged={f"clip: {mode}": [r["diverged"] for r in rs] for mode, rs in runs.items()},
    )
    for k, (mode, rs) in enumerate(runs.items()):
        before = [r["grad_norm_before_clip"] for r in rs]
        plotting.band(ax_g, range(1, steps + 1), before, label=f"{mode}: before clipping",
                      color=f"C{k}", log=True)  # fmt: skip
        if mode != "none":
            after = stats.mean_profile([r["grad_norm_after_clip"] for r in rs])
            plotting.profile(ax_g, range(1, len(after) + 1), after, label=f"{mode}: after clipping",
                             predicted=True, color=f"C{k}")  # fmt: skip
    ax_g.axhline(THRESHOLD, color="gray", linestyle=":", label="threshold")
    plotting.label(ax_l, "training loss", "SGD step", "cross-entropy")
    plotting.label(ax_g, "global gradient norm (dashed: after clipping)", "SGD step", "||g||")

    def mean(rs: list[dict], key: str) -> float:
        return statistics.fmean(stats.each(rs, key))

    diverged_at = [r["steps_run"] for r in none if r["diverged"]]
    return Result(
        setup=(
            f"Digits; ReLU MLP with {depth} hidden layers of 64, weights N(0, {GAIN:g}^2/fan_in) "
            f"(twice He's standard deviation, so the forward signal and the gradient grow by "
            f"about sqrt({GAIN:g}^2/2) = {GAIN / math.sqrt(2):.2f} per layer), biases 0; SGD lr "
            f"{LR}, batch 128, {steps} steps, random seeds {seeds}. Three runs from the same "
            "weights and batches per seed: no "
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
            "seeds": seeds,
            "first_grad_norm": stats.summary([r["grad_norm_before_clip"][0] for r in none]),
            "diverged": {m: [r["diverged"] for r in rs] for m, rs in runs.items()},
            "steps_run": {m: [r["steps_run"] for r in rs] for m, rs in runs.items()},
            "final_loss": {
                m: stats.summary(stats.each(rs, "final_loss")) for m, rs in runs.items()
            },
            "test_accuracy": {
                m: stats.summary(stats.each(rs, "test_accuracy")) for m, rs in runs.items()
            },
            "max_norm_after_clip": max(stats.each(norm, "max_after_norm")),
            "max_element_after_clip": max(stats.each(value, "max_after_element")),
            "runs": runs,
            "checks": checks,
        },
        rule=(
            "Fixed before the run: final_loss = mean training loss over the last 10% of steps; "
            "diverged = a non-finite loss occurred. Each check must hold in every one of the "
            f"{len(seeds)} seeds (same weights and batches for the three runs of a seed). Holds "
            "if all checks in numbers.checks pass, partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Means over {len(seeds)} seeds. The first gradient has global norm "
            f"{statistics.fmean(r['grad_norm_before_clip'][0] for r in none):.3g}. Without "
            + (
                f"clipping the loss became non-finite in {len(diverged_at)} of {len(seeds)} "
                f"seeds (at steps {diverged_at})"
                if diverged_at
                else f"clipping training stayed finite (final loss {mean(none, 'final_loss'):.3f})"
            )
            + f"; clipped by norm: final loss {mean(norm, 'final_loss'):.3f}, test accuracy "
            f"{mean(norm, 'test_accuracy'):.3f}; clipped by value: final loss "
            f"{mean(value, 'final_loss'):.3f}, test accuracy {mean(value, 'test_accuracy'):.3f}. "
            "Largest global norm after norm clipping "
            f"{max(stats.each(norm, 'max_after_norm')):.6g}; largest element after value "
            f"clipping {max(stats.each(value, 'max_after_element')):.6g}. Clipping does not "
            "remove the cause (the initialization amplifies); it bounds each step, so SGD cannot "
            "overshoot into the region where the loss and gradients blow up."
            + stats.seed_note(config, seeds)
        ),
        figures={"loss_and_norms": fig},
    )
