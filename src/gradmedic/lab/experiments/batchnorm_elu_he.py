"""R6, source 004's experiment: 300-100 ELU net, He init, batch norm before each ELU, vs none."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

import gradmedic
from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, Verdict, experiment, judge
from gradmedic.lab.claims import SOURCES
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "batchnorm_elu_he"
SOURCE = SOURCES["004"].label
TITLE = "Source 004's batch-norm experiment: 300-100 ELU, He init, BN (momentum 0.9) vs none"
HIDDEN = (300, 100)
LR = 0.01
BATCH = 200
MOMENTUM = 0.1  # PyTorch's convention; TensorFlow's momentum 0.9 = keep 90% of the old average
ACC_MARGIN = 0.01  # one point of test accuracy
LEARNED = 0.5  # test accuracy below this (chance 0.1): the net did not learn
SATURATED = -2.3  # ELU'(z) = exp(z) < 0.1 below this


def build(n_in: int, n_out: int, norm: bool) -> nn.Sequential:
    """Linear -> [BN] -> ELU twice, then Linear -> [BN] on the logits (as the source's code)."""
    model = _nets.mlp([n_in, *HIDDEN, n_out], nn.ELU, init="he")
    if norm:
        model = gradmedic.surgery.add_normalization(model, kind="batch")
        model.append(nn.BatchNorm1d(n_out))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = MOMENTUM
    return model


def elu_inputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ELU module for a batch ``x`` (evaluation mode)."""
    seen: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
        for m in model.modules()
        if isinstance(m, nn.ELU)
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    for h in handles:
        h.remove()
    return seen


def bn_run(norm: bool, dataset: data.Dataset, steps: int, eval_every: int, seed: int) -> dict:
    """Train one net; per-Linear gradient norms of every step via gradmedic.watch."""
    torch.manual_seed(seed)
    model = build(dataset.n_features, dataset.n_classes, norm)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    names = _nets.linear_names(model)
    with gradmedic.watch(model, opt, deltas=False, updates=False, history=steps) as mon:
        curves = train(
            model, dataset, opt, steps=steps, batch_size=BATCH, eval_every=eval_every, seed=seed
        )
        rows = mon.history.rows()
    per_layer = [
        statistics.fmean(g) for g in zip(*(_nets.profile(r, names) for r in rows), strict=True)
    ]
    z = elu_inputs(model, dataset.x_test)
    return {
        "test_accuracy": curves.test_accuracy,
        "final_accuracy": curves.final_accuracy,
        "loss": curves.loss,
        "mean_grad_norm_per_layer": per_layer,
        "grad_spread": max(per_layer) / min(per_layer),
        "preact_mean": [float(t.mean()) for t in z],
        "preact_std": [float(t.std()) for t in z],
        "saturated_share": [float((t < SATURATED).double().mean()) for t in z],
    }


@experiment(NAME, ["R6"], TITLE)
def run(config: LabConfig) -> Result:
    dataset = data.load(config.seed, config.mnist_dir)
    epochs = config.pick(5, 20)
    per_epoch = len(dataset.x_train) // BATCH
    steps = epochs * per_epoch
    seeds = stats.seeds(config)
    runs = {
        name: [bn_run(name == "batchnorm", dataset, steps, per_epoch, s) for s in seeds]
        for name in ("plain", "batchnorm")
    }

    def each(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    sat = {n: [max(r["saturated_share"]) for r in runs[n]] for n in runs}
    spread = {n: [math.log10(r["grad_spread"]) for r in runs[n]] for n in runs}
    acc = {n: each(n, "final_accuracy") for n in runs}
    cmp_sat = stats.compare(sat["batchnorm"], sat["plain"], margin=0.005)
    cmp_spread = stats.compare(spread["plain"], spread["batchnorm"], margin=0.05)
    cmp_acc = stats.compare(acc["batchnorm"], acc["plain"], margin=ACC_MARGIN)
    learned = min(min(v) for v in acc.values()) >= LEARNED
    checks = {
        f"BN keeps ELU inputs out of the saturated range (z < {SATURATED}) at least as well "
        "(BN's share not higher beyond the seeds' spread)": cmp_sat["outcome"] != "a > b",
        "BN evens out the per-layer gradient norms (log10 max/min spread smaller by more than "
        "0.05 and the seeds' spread)": cmp_spread["outcome"] == "a > b",
        f"BN reaches a higher test accuracy after the same epochs (by more than {ACC_MARGIN:g} "
        "and the seeds' spread)": cmp_acc["outcome"] == "a > b",
    }
    verdict = judge(checks) if learned else Verdict.INCONCLUSIVE

    fig, (ax_a, ax_g) = plotting.figure(2, width=4.2)
    for k, name in enumerate(runs):
        xs = [s / per_epoch for s, _ in runs[name][0]["test_accuracy"]]
        curves = [[a for _, a in r["test_accuracy"]] for r in runs[name]]
        plotting.band(ax_a, xs, curves, label=name, color=f"C{k}")
    n_layers = len(runs["plain"][0]["mean_grad_norm_per_layer"])
    plotting.grouped_bars(
        ax_g,
        [f"Linear {i}" for i in range(1, n_layers + 1)],
        {n: [r["mean_grad_norm_per_layer"] for r in runs[n]] for n in runs},
        log=True,
    )
    plotting.label(ax_a, "test accuracy", "epoch", "accuracy")
    plotting.label(ax_g, "mean gradient norm over training", "layer", "||dL/dW_l||")

    sizes = "-".join(str(n) for n in (dataset.n_features, *HIDDEN, dataset.n_classes))
    return Result(
        setup=(
            f"{SOURCE.capitalize()}'s recipe on {dataset.name} ({len(dataset.x_train)} training "
            f"examples): {sizes}, He-normal weights (gradmedic.init.apply(model, 'he')), "
            "BatchNorm1d before each ELU (gradmedic.surgery.add_normalization) and on the logits "
            f"(TensorFlow momentum 0.9 = PyTorch momentum {MOMENTUM}), SGD lr {LR}, batch "
            f"{BATCH}, {epochs} epochs ({steps} steps), random seeds {seeds}. Compared with the "
            "same net without batch norm, same weights and batches per seed. Per-layer gradient "
            "norms at every step from gradmedic.watch; ELU inputs measured on the test set after "
            "training."
        ),
        expected=(
            "Normalizing the pre-activations keeps them in ELU's non-saturated range and "
            "stabilizes the gradient; the batch-normalized net trains better."
        ),
        numbers={
            "dataset": dataset.name,
            "epochs": epochs,
            "steps": steps,
            "seeds": seeds,
            "final_accuracy": {n: stats.summary(v) for n, v in acc.items()},
            "log10_grad_spread": {n: stats.summary(v) for n, v in spread.items()},
            "max_saturated_share": {n: stats.summary(v) for n, v in sat.items()},
            "accuracy_batchnorm_minus_plain": cmp_acc,
            "log10_spread_plain_minus_batchnorm": cmp_spread,
            "saturated_batchnorm_minus_plain": cmp_sat,
            "learned": learned,
            "runs": runs,
            "checks": checks,
        },
        rule=(
            "Fixed before the run: over the seeds, a difference counts only when its mean is "
            "larger than the stated margin and than twice its standard error (paired by seed). "
            "grad_spread = max/min over the Linear layers of the mean gradient norm over "
            f"training; saturated share = share of ELU inputs below {SATURATED} (ELU' < 0.1), "
            "the larger of the two hidden layers. Inconclusive if a net of any seed ends below "
            f"{LEARNED:g} test accuracy (it did not learn, so there is nothing to compare); "
            "else holds if all checks pass, partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Test accuracy after {epochs} epochs over {len(seeds)} seeds: batchnorm "
            f"{stats.summary(acc['batchnorm'])['mean']:.3f}, plain "
            f"{stats.summary(acc['plain'])['mean']:.3f}; difference "
            f"{stats.describe(cmp_acc)}: {_word(cmp_acc)}. log10 per-layer gradient spread "
            f"(max/min): batchnorm {stats.summary(spread['batchnorm'])['mean']:.2f}, plain "
            f"{stats.summary(spread['plain'])['mean']:.2f}. Saturated ELU inputs: batchnorm "
            f"{stats.summary(sat['batchnorm'])['mean']:.3f}, plain "
            f"{stats.summary(sat['plain'])['mean']:.3f}."
            + (
                " In a network this shallow with He init the gradient does not vanish to begin "
                "with (the plain net's per-layer spread is already small), so there is little "
                "for batch normalization to rescue here."
                if stats.summary(spread["plain"])["mean"] < 1
                else ""
            )
            + ("" if learned else f" A net ended below {LEARNED:g} accuracy: inconclusive.")
        ),
        figures={"accuracy_and_gradients": fig},
    )


def _word(cmp: dict) -> str:
    return {
        "a > b": "batch norm ahead beyond noise",
        "a < b": "the plain net ahead beyond noise",
        "tie": "a tie at this number of seeds",
    }[cmp["outcome"]]
