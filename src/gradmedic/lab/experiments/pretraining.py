"""R10: greedy layer-wise autoencoder pre-training, then fine-tuning, vs random init."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from gradmedic.lab import data, plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets

NAME = "pretraining"
TITLE = "Layer-wise pre-training (greedy autoencoders) then fine-tuning vs random init"
FINE_TUNE_LR = 1.0
PRETRAIN_LR = 0.01
BATCH = 128
MARGIN = {"log10_first_layer_grad": 0.1, "log10_first_over_last": 0.1, "test_accuracy": 0.01}


def pretrain(model: nn.Sequential, x: torch.Tensor, steps: int, seed: int) -> list[float]:
    """Greedy autoencoders, one hidden layer at a time, no labels (Bengio et al. 2007).

    Hidden layer ``k`` (``Linear_k`` then sigmoid) is the encoder of an autoencoder with a
    fresh linear decoder, trained by Adam to reconstruct its input ``h_{k-1}`` (MSE); then
    ``h_k = sigmoid(Linear_k(h_{k-1}))`` feeds the next one. The output layer is left as it is.

    Returns:
        The final reconstruction error of each layer.
    """
    gen = torch.Generator().manual_seed(seed)
    h = x
    errors = []
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    for enc in hidden:
        dec = nn.Linear(enc.out_features, enc.in_features)
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=PRETRAIN_LR)
        for _ in range(steps):
            xb = h[torch.randint(0, len(h), (BATCH,), generator=gen)]
            loss = nn.functional.mse_loss(dec(torch.sigmoid(enc(xb))), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        errors.append(float(loss.detach()))
        with torch.no_grad():
            h = torch.sigmoid(enc(h))
    return errors


def fine_tune(model: nn.Sequential, dataset: data.Dataset, steps: int, seed: int) -> dict:
    """SGD on the labels; the step-0 gradient profile from gradmedic.watch."""
    opt = torch.optim.SGD(model.parameters(), lr=FINE_TUNE_LR)
    curves, grads = _nets.train_profiled(
        model, dataset, opt, steps=steps, batch_size=BATCH, seed=seed
    )
    return {
        "grad_profile": grads,
        "log10_first_layer_grad": math.log10(grads[0]),
        "log10_first_over_last": math.log10(grads[0] / grads[-1]),
        "loss": curves.loss,
        "final_loss": _nets.final_loss(curves, steps),
        "test_accuracy": curves.final_accuracy,
    }


def seed_run(
    sizes: list[int], dataset: data.Dataset, pre_steps: int, steps: int, seed: int
) -> dict:
    """The random and the pre-trained net of one seed: the same initial weights and batches."""
    torch.manual_seed(seed)
    random_net = _nets.mlp(sizes, nn.Sigmoid)
    torch.manual_seed(seed)
    pre_net = _nets.mlp(sizes, nn.Sigmoid)
    errors = pretrain(pre_net, dataset.x_train, pre_steps, seed)
    return {
        "reconstruction_error": errors,
        "random": fine_tune(random_net, dataset, steps, seed),
        "pretrained": fine_tune(pre_net, dataset, steps, seed),
    }


@experiment(NAME, ["R10"], TITLE)
def run(config: LabConfig) -> Result:
    depth = config.pick(4, 5)
    width = config.pick(32, 64)
    pre_steps = config.pick(100, 300)
    steps = config.pick(200, 1000)
    dataset = data.digits(config.seed)
    sizes = [dataset.n_features, *[width] * depth, 10]

    seeds = stats.comparison_seeds(config)
    per_seed = [seed_run(sizes, dataset, pre_steps, steps, s) for s in seeds]
    runs = {n: [r[n] for r in per_seed] for n in ("random", "pretrained")}
    keys = ("log10_first_layer_grad", "log10_first_over_last", "test_accuracy")
    values = {k: {n: stats.each(v, k) for n, v in runs.items()} for k in keys}
    cmp = {
        k: stats.compare(values[k]["pretrained"], values[k]["random"], margin=MARGIN[k])
        for k in keys
    }
    checks = {
        f"pre-trained: larger first-layer gradient at the start of fine-tuning (log10 higher "
        f"by more than {MARGIN['log10_first_layer_grad']:g} and the seeds' spread)": cmp[
            "log10_first_layer_grad"
        ]["outcome"]
        == "a > b",
        f"pre-trained: larger first/last-layer gradient ratio (log10 higher by more than "
        f"{MARGIN['log10_first_over_last']:g} and the seeds' spread)": cmp["log10_first_over_last"][
            "outcome"
        ]
        == "a > b",
        "pre-trained: higher test accuracy after the same fine-tuning steps (by more than "
        f"{MARGIN['test_accuracy']:g} and the seeds' spread)": cmp["test_accuracy"]["outcome"]
        == "a > b",
    }
    verdict = judge(checks)

    fig, _, _ = plotting.profile_and_loss(
        runs, profile_title="gradient at the start of fine-tuning", loss_title="fine-tuning loss"
    )
    mean = {k: {n: statistics.fmean(v) for n, v in d.items()} for k, d in values.items()}

    return Result(
        setup=(
            f"Digits; sigmoid MLP {sizes[0]}-{width}x{depth}-10, "
            "PyTorch's default init. Pre-training: each hidden layer in turn is the encoder of "
            f"an autoencoder (fresh linear decoder, MSE, Adam lr {PRETRAIN_LR}, {pre_steps} "
            f"steps of {BATCH} unlabelled images per layer) fed by the previous layer's output. "
            f"Fine-tuning: SGD lr {FINE_TUNE_LR}, batch {BATCH}, {steps} steps on the labels, "
            f"the same for the random and the pre-trained net (same batches), random seeds {seeds}."
        ),
        expected=(
            "Layer-wise pre-training without labels puts the deep net where fine-tuning can "
            "move its early layers, so it trains where the randomly initialized one is stuck."
        ),
        numbers={
            "depth": depth,
            "width": width,
            "pretrain_steps_per_layer": pre_steps,
            "fine_tune_steps": steps,
            "seeds": seeds,
            "reconstruction_error": [r["reconstruction_error"] for r in per_seed],
            **{k: {n: stats.summary(v) for n, v in d.items()} for k, d in values.items()},
            "final_loss": {n: stats.summary(stats.each(v, "final_loss")) for n, v in runs.items()},
            "pretrained_minus_random": cmp,
            "runs": runs,
            "checks": checks,
        },
        rule=(
            "Fixed before the run: gradients are the per-layer norms at the first fine-tuning "
            f"step (gradmedic.watch), compared in log10. Over {len(seeds)} seeds (paired by "
            "seed: same initial weights and batches) the pre-trained net is ahead when the mean "
            "difference exceeds the stated margin and twice its standard error. Holds if all "
            "checks pass, partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Means over {len(seeds)} seeds. log10 first-layer gradient at the start of "
            f"fine-tuning: random {mean['log10_first_layer_grad']['random']:.2f}, pre-trained "
            f"{mean['log10_first_layer_grad']['pretrained']:.2f} (log10 first/last "
            f"{mean['log10_first_over_last']['random']:.2f} vs "
            f"{mean['log10_first_over_last']['pretrained']:.2f}). Test accuracy after {steps} "
            f"steps: random {mean['test_accuracy']['random']:.3f}, pre-trained "
            f"{mean['test_accuracy']['pretrained']:.3f}; difference "
            f"{stats.describe(cmp['test_accuracy'])}. The pre-training cost {depth} x "
            f"{pre_steps} extra unlabelled steps."
            + (
                " The sigmoid chain still shrinks the gradient toward the input after "
                "pre-training; what changes is that the early layers already compute useful "
                "features, so fine-tuning needs to move them less."
                if mean["log10_first_over_last"]["pretrained"] < -1
                else ""
            )
            + stats.seed_note(config, seeds)
        ),
        figures={"gradients_and_fine_tuning": fig},
    )
