"""R3 (source 003): does adding N ReLU layers divide the activation rate by 2^N? Units vs paths.

Source 003 is 'Exploding and vanishing gradients' (see gradmedic.lab.claims.SOURCES).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradmedic.lab import data, plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.experiments import _nets
from gradmedic.lab.train import train

NAME = "relu_sparsity"
TITLE = "ReLU activation rate over depth: units vs paths (the 2^N claim)"
TOLERANCE = 0.1  # a per-layer factor within 0.5 +- this counts as "halving"


def rates(model: nn.Sequential, x: torch.Tensor) -> dict[str, list[float]]:
    """Per hidden layer ``l``: the share of active units, and of active input-to-``l`` paths.

    A path picks one unit in each of layers ``1..l``; for one input it is active when all
    its units are, so the active share is ``prod_k (active units in k / width of k)``,
    averaged over the inputs.
    """
    unit, path = [], []
    running = torch.ones(len(x), dtype=torch.float64)
    h = x
    with torch.no_grad():
        for module in model:
            h = module(h)
            if isinstance(module, nn.ReLU):
                share = (h > 0).double().mean(dim=1)  # per input
                running = running * share
                unit.append(float(share.mean()))
                path.append(float(running.mean()))
    return {"unit": unit, "path": path}


def factor(values: list[float], first: float = 1.0) -> float:
    """Geometric-mean factor per layer from ``first`` to ``values[-1]`` over ``len`` steps."""
    n = len(values) - (1 if first != 1.0 else 0)
    return (values[-1] / first) ** (1 / n) if values[-1] > 0 else 0.0


@experiment(NAME, ["R3"], TITLE)
def run(config: LabConfig) -> Result:
    depth = config.pick(8, 12)
    width = config.pick(128, 256)
    steps = config.pick(100, 600)
    dataset = data.digits(config.seed)
    torch.manual_seed(config.seed)
    model = _nets.mlp([dataset.n_features, *[width] * depth, 10], nn.ReLU, init="he")
    measured = {"init": rates(model, dataset.x_test)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curves = train(model, dataset, opt, steps=steps, batch_size=128, seed=config.seed)
    measured["trained"] = rates(model, dataset.x_test)

    factors = {
        when: {
            "unit": factor(m["unit"], first=m["unit"][0]),
            "path": factor(m["path"]),
        }
        for when, m in measured.items()
    }

    def halves(f: float) -> bool:
        return abs(f - 0.5) <= TOLERANCE

    checks = {
        f"units (init): the active share falls by a factor 0.5 +- {TOLERANCE:g} per layer": (
            halves(factors["init"]["unit"])
        ),
        f"units (trained): the active share falls by 0.5 +- {TOLERANCE:g} per layer": (
            halves(factors["trained"]["unit"])
        ),
        f"paths (init): the active share falls by 0.5 +- {TOLERANCE:g} per layer": (
            halves(factors["init"]["path"])
        ),
        f"paths (trained): the active share falls by 0.5 +- {TOLERANCE:g} per layer": (
            halves(factors["trained"]["path"])
        ),
    }
    verdict = judge(checks)
    units_halve = any(v for k, v in checks.items() if k.startswith("units"))

    fig, ax = plotting.figure(1, width=5.5)
    layers = list(range(1, depth + 1))
    for k, (when, m) in enumerate(measured.items()):
        plotting.profile(ax, layers, m["unit"], label=f"units, {when}", color=f"C{k}")
        plotting.profile(ax, layers, m["path"], label=f"paths, {when}", color=f"C{k + 2}")
    plotting.profile(
        ax, layers, [0.5**n for n in layers], label="claim: 2^-N", predicted=True, color="gray"
    )
    plotting.label(ax, "share active over depth", "hidden layer N", "active share")

    unit_init, unit_trained = measured["init"]["unit"], measured["trained"]["unit"]
    return Result(
        setup=(
            f"ReLU MLP {dataset.n_features}-{width}x{depth}-10, He init (gradmedic.init.apply), "
            f"on the digits test images; measured at initialization and after {steps} Adam "
            "steps (lr 1e-3, batch 128). Unit share: active units / width per layer, averaged "
            "over inputs. Path share: active input-to-layer-N paths (one unit per layer, all "
            "active) / all such paths, averaged over inputs."
        ),
        expected=(
            "Source 003 ('Exploding and vanishing gradients'): 'when N layers are added, the "
            "ReLU activation rate drops by a factor "
            "2^N' (each layer halving it)."
        ),
        numbers={
            "depth": depth,
            "width": width,
            "unit_share": {w: m["unit"] for w, m in measured.items()},
            "path_share": {w: m["path"] for w, m in measured.items()},
            "per_layer_factor": factors,
            "train_final_loss": curves.loss[-1],
            "test_accuracy": curves.final_accuracy,
            "checks": checks,
        },
        rule=(
            "Per-layer factor of the unit share = (share at layer N / share at layer 1)^(1/(N-1)); "
            "of the path share = (share at layer N)^(1/N). The claim holds for units if the "
            f"factor is 0.5 +- {TOLERANCE:g}. Holds if all four checks pass (units and paths, "
            "init and trained), partly if some do (e.g. paths only), does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Share of active units: layer 1 "
            f"{unit_init[0]:.2f}, layer {depth} {unit_init[-1]:.2f} at init; "
            f"{unit_trained[0]:.2f} and {unit_trained[-1]:.2f} after training (per-layer factor "
            f"{factors['init']['unit']:.2f} / {factors['trained']['unit']:.2f}, the claim "
            "needs 0.5). What halves with each layer is the share of paths whose units are all "
            f"active: per-layer factor {factors['init']['path']:.2f} at init, "
            f"{factors['trained']['path']:.2f} trained; after {depth} layers "
            f"{measured['init']['path'][-1]:.2g} of the paths are active against "
            f"2^-{depth} = {2.0**-depth:.2g}."
            + (
                " A unit is active on about half the inputs however deep it sits, because He "
                "init keeps each layer's pre-activations centred; the sparsity compounds along "
                "paths, not in units."
                if not units_halve
                else ""
            )
            + ("" if math.isfinite(curves.loss[-1]) else " (Training diverged.)")
        ),
        figures={"active_share": fig},
    )
