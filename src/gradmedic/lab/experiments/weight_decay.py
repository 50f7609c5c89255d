"""R5: L2 weight decay keeps the weight norms, and so the product of layer gains, small."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

import gradmedic
from gradmedic.lab import data, plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "weight_decay"
TITLE = "L2 weight decay: weight norms, the product of spectral norms, gradient size"
DECAYS = (0.0, 1e-3, 1e-2)
LR = 0.1
MOMENTUM = 0.9


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
        "grad_norm": curves.grad_norm,
        "diverged": curves.diverged,
        "test_accuracy": curves.final_accuracy,
    }


def decreasing(values: list[float]) -> bool:
    """Strictly decreasing."""
    return all(b < a for a, b in itertools.pairwise(values))


@experiment(NAME, ["R5"], TITLE)
def run(config: LabConfig) -> Result:
    depth = 6
    steps = config.pick(150, 1000)
    dataset = data.digits(config.seed)
    runs = {d: decay_run(d, dataset, depth, steps, config.seed) for d in DECAYS}
    wnorm = [runs[d]["weight_norm"] for d in DECAYS]
    prod = [runs[d]["log10_product_spectral_norms"] for d in DECAYS]
    gmax = [runs[d]["max_grad_norm"] for d in DECAYS]
    checks = {
        "the weight norm after training falls as the decay grows": decreasing(wnorm),
        "the product of per-layer spectral norms falls as the decay grows": decreasing(prod),
        "the largest gradient norm during training falls as the decay grows": decreasing(gmax),
    }
    verdict = judge(checks)

    fig, (ax_s, ax_g) = plotting.figure(2, width=4.2)
    for k, d in enumerate(DECAYS):
        r = runs[d]
        layers = range(1, len(r["spectral_norms"]) + 1)
        plotting.profile(ax_s, layers, r["spectral_norms"], label=f"decay {d:g}", color=f"C{k}")
        plotting.profile(
            ax_g,
            range(1, len(r["grad_norm"]) + 1),
            r["grad_norm"],
            label=f"decay {d:g}",
            color=f"C{k}",
        )
    plotting.profile(
        ax_s, layers, runs[0.0]["spectral_norms_init"], label="init", predicted=True, color="gray"
    )
    plotting.label(
        ax_s, "largest singular value per layer after training", "Linear layer", "sigma_max(W_l)"
    )
    plotting.label(ax_g, "global gradient norm", "SGD step", "||g||")

    return Result(
        name=NAME,
        claims=["R5"],
        title=TITLE,
        setup=(
            f"Digits; ReLU MLP {dataset.n_features}-64x{depth}-10, He init; SGD lr {LR}, "
            f"momentum {MOMENTUM}, batch 128, {steps} steps, with L2 weight decay "
            + ", ".join(f"{d:g}" for d in DECAYS)
            + " on the Linear weights (gradmedic.add_weight_decay; biases not decayed). Same "
            "weights and batches. The product of the layers' largest singular values bounds "
            "how much the backward pass can amplify a gradient (ReLU's slope is at most 1)."
        ),
        expected=(
            "The L2 penalty keeps the weights' norms small, which limits the product of "
            "per-layer factors that makes gradients explode."
        ),
        numbers={
            "decays": list(DECAYS),
            "weight_norm": dict(zip(map(str, DECAYS), wnorm, strict=True)),
            "log10_product_spectral_norms": dict(zip(map(str, DECAYS), prod, strict=True)),
            "log10_product_spectral_norms_init": runs[0.0]["log10_product_spectral_norms_init"],
            "max_grad_norm": dict(zip(map(str, DECAYS), gmax, strict=True)),
            "test_accuracy": {str(d): runs[d]["test_accuracy"] for d in DECAYS},
            "runs": {str(d): r for d, r in runs.items()},
            "checks": checks,
        },
        rule=(
            "Holds if all checks in numbers.checks pass (each quantity strictly decreasing "
            "with the decay), partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            "Weight norm after training: "
            + ", ".join(f"decay {d:g}: {v:.1f}" for d, v in zip(DECAYS, wnorm, strict=True))
            + ". log10 of the product of spectral norms (init "
            + f"{runs[0.0]['log10_product_spectral_norms_init']:.2f}): "
            + ", ".join(f"{d:g}: {v:.2f}" for d, v in zip(DECAYS, prod, strict=True))
            + ". Largest gradient norm during training: "
            + ", ".join(f"{d:g}: {v:.3g}" for d, v in zip(DECAYS, gmax, strict=True))
            + ". Test accuracy: "
            + ", ".join(f"{d:g}: {runs[d]['test_accuracy']:.3f}" for d in DECAYS)
            + ". The decay bounds the product through the norms; whether that also lowers the "
            "gradient depends on the data term, which dominates early in training."
        ),
        figures={"spectra_and_gradients": fig},
    )
