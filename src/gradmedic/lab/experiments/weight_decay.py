"""R5: L2 weight decay keeps the weight norms, and so the product of layer gains, small."""

from __future__ import annotations

import itertools
import math
import statistics

import torch
from torch import nn

import gradmedic
from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "weight_decay"
TITLE = "L2 weight decay: weight norms, the product of spectral norms, gradient size"
DECAYS = (0.0, 1e-3, 1e-2)
LR = 0.1
MOMENTUM = 0.9
MARGIN_LOG10 = 0.02  # a 5% change is the smallest that counts


def spectral_norms(model: nn.Module) -> list[float]:
    """Largest singular value of each Linear weight, input side first."""
    return [
        float(torch.linalg.matrix_norm(m.weight.detach(), ord=2))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]


def decay_run(decay: float, dataset: data.Dataset, depth: int, steps: int, seed: int) -> dict:
    """Train with ``decay`` on the weights (gradmedic.add_weight_decay); norms at the end."""
    torch.manual_seed(seed)
    model = _nets.mlp([dataset.n_features, *[64] * depth, 10], nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    gradmedic.add_weight_decay(opt, model, weight_decay=decay)
    sigma0 = spectral_norms(model)
    curves = train(model, dataset, opt, steps=steps, batch_size=128, seed=seed)
    sigma = spectral_norms(model)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    return {
        "spectral_norms_init": sigma0,
        "spectral_norms": sigma,
        "log10_product_spectral_norms": sum(math.log10(s) for s in sigma),
        "log10_product_spectral_norms_init": sum(math.log10(s) for s in sigma0),
        "weight_norm": float(torch.linalg.vector_norm(torch.cat([w.flatten() for w in weights]))),
        "max_grad_norm": max(curves.grad_norm),
        "median_grad_norm_late": statistics.median(curves.grad_norm[len(curves.grad_norm) // 2 :]),
        "grad_norm": curves.grad_norm,
        "diverged": curves.diverged,
        "test_accuracy": curves.final_accuracy,
    }


def falls(values: dict[float, list[float]], margin: float) -> tuple[bool, list[dict]]:
    """Each decay's values below the previous decay's, beyond ``margin`` and the seeds' spread."""
    steps = [
        stats.compare(values[a], values[b], margin=margin) for a, b in itertools.pairwise(DECAYS)
    ]
    return all(c["outcome"] == "a > b" for c in steps), steps


@experiment(NAME, ["R5"], TITLE)
def run(config: LabConfig) -> Result:
    depth = 6
    steps = config.pick(150, 1000)
    dataset = data.digits(config.seed)
    seeds = stats.comparison_seeds(config)
    runs = {d: [decay_run(d, dataset, depth, steps, s) for s in seeds] for d in DECAYS}

    def per(key: str, fn=lambda v: v) -> dict[float, list[float]]:  # noqa: ANN001
        return {d: [fn(r[key]) for r in runs[d]] for d in DECAYS}

    wnorm = per("weight_norm", math.log10)
    prod = per("log10_product_spectral_norms")
    gmed = per("median_grad_norm_late", math.log10)
    gmax = per("max_grad_norm", math.log10)
    ok_w, cmp_w = falls(wnorm, MARGIN_LOG10)
    ok_p, cmp_p = falls(prod, MARGIN_LOG10)
    ok_g, cmp_g = falls(gmed, MARGIN_LOG10)
    checks = {
        "the weight norm after training falls as the decay grows": ok_w,
        "the product of per-layer spectral norms falls as the decay grows": ok_p,
        "the typical gradient norm (median over the second half of training) falls as the "
        "decay grows": ok_g,
    }
    verdict = judge(checks)

    fig, (ax_s, ax_g) = plotting.figure(2, width=4.2)
    n_layers = len(runs[0.0][0]["spectral_norms"])
    plotting.grouped_bars(
        ax_s,
        [str(i) for i in range(1, n_layers + 1)],
        {
            "init": [r["spectral_norms_init"] for r in runs[0.0]],
            **{f"decay {d:g}": [r["spectral_norms"] for r in runs[d]] for d in DECAYS},
        },
    )
    for k, d in enumerate(DECAYS):
        curves = [r["grad_norm"] for r in runs[d]]
        plotting.band(
            ax_g, range(1, steps + 1), curves, label=f"decay {d:g}", color=f"C{k + 1}", log=True
        )
    plotting.label(
        ax_s, "largest singular value per layer after training", "Linear layer", "sigma_max(W_l)"
    )
    plotting.label(ax_g, "global gradient norm", "SGD step", "||g||")

    def mean(v: dict[float, list[float]], d: float) -> float:
        return statistics.fmean(v[d])

    key = {d: "decay_" + (f"{d:.0e}".replace("e-0", "e-") if d else "0") for d in DECAYS}
    return Result(
        setup=(
            f"Digits; ReLU MLP {dataset.n_features}-64x{depth}-10, He init; SGD lr {LR}, "
            f"momentum {MOMENTUM}, batch 128, {steps} steps, with L2 weight decay "
            + ", ".join(f"{d:g}" for d in DECAYS)
            + " on the Linear weights (gradmedic.add_weight_decay; biases not decayed), random "
            f"seeds {seeds}; same weights and batches per seed. The product of the layers' "
            "largest singular values bounds how much the backward pass can amplify a gradient "
            "(ReLU's slope is at most 1)."
        ),
        expected=(
            "The L2 penalty keeps the weights' norms small, which limits the product of "
            "per-layer factors that makes gradients explode."
        ),
        numbers={
            "decays": list(DECAYS),
            "seeds": seeds,
            "log10_weight_norm": {key[d]: stats.summary(wnorm[d]) for d in DECAYS},
            "log10_product_spectral_norms": {key[d]: stats.summary(prod[d]) for d in DECAYS},
            "log10_median_grad_norm_late": {key[d]: stats.summary(gmed[d]) for d in DECAYS},
            "log10_max_grad_norm": {key[d]: stats.summary(gmax[d]) for d in DECAYS},
            "steps_weight_norm": cmp_w,
            "steps_product": cmp_p,
            "steps_median_grad_norm": cmp_g,
            "test_accuracy": {
                key[d]: stats.summary([r["test_accuracy"] for r in runs[d]]) for d in DECAYS
            },
            "runs": {key[d]: r for d, r in runs.items()},
            "checks": checks,
        },
        rule=(
            "Fixed before the run: each quantity is compared in log10 between consecutive decays "
            f"over {len(seeds)} seeds (paired by seed); it falls when the mean drop exceeds "
            f"{MARGIN_LOG10:g} (a factor {10**MARGIN_LOG10:.2f}) and twice its standard error. "
            "The gradient check uses the median over the second half of training, not the "
            "single largest step, so one early spike cannot decide it. Holds if all checks pass, "
            "partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            "Means over seeds. log10 weight norm after training: "
            + ", ".join(f"decay {d:g}: {mean(wnorm, d):.2f}" for d in DECAYS)
            + ". log10 product of spectral norms (init "
            + f"{statistics.fmean(r['log10_product_spectral_norms_init'] for r in runs[0.0]):.2f}"
            + "): "
            + ", ".join(f"{d:g}: {mean(prod, d):.2f}" for d in DECAYS)
            + ". log10 median gradient norm, second half: "
            + ", ".join(f"{d:g}: {mean(gmed, d):.2f}" for d in DECAYS)
            + " (largest single step: "
            + ", ".join(f"{d:g}: {mean(gmax, d):.2f}" for d in DECAYS)
            + "). The decay bounds the product through the norms; whether that also lowers the "
            "gradient depends on the data term: a net held to small weights fits the data less "
            "well, its loss stays higher and so can its gradient." + stats.seed_note(config, seeds)
        ),
        figures={"spectra_and_gradients": fig},
    )
