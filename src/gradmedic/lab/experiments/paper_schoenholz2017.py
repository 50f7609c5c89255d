"""Schoenholz et al. 2017's result: the trainability phase diagram of deep tanh nets.

Depth x sigma_w^2 at sigma_b^2 = 0.05: nets train to a depth of about 6 xi_c,
where xi_c is the mean-field depth scale of the correlation between inputs; xi_c
diverges at the critical point (sigma_w^2 about 1.76). Beside it, gradmedic's
own preflight (``gradmedic.check`` before training) predicts each cell, and the
agreement of the two predictions with training is measured.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

import gradmedic
from gradmedic.lab import data, plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.lab.claims import PAPERS
from gradmedic.lab.train import train

NAME = "paper_schoenholz2017"
PAPER = PAPERS["schoenholz2017"]
TITLE = "Schoenholz et al. 2017: trainability of deep tanh nets against depth scale and preflight"
SIGMA_B2 = 0.05
WIDTH = 32
LR = 0.003
MOMENTUM = 0.9
BATCH = 64
LEARNED = 0.5  # test accuracy (chance 0.1) that counts as trained
AGREE = 0.75  # share of cells a prediction must get right
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(61)  # E[f(z)], z ~ N(0, 1)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def _dtanh(u: np.ndarray) -> np.ndarray:
    return 1.0 - np.tanh(u) ** 2


def fixed_point_q(sigma_w2: float, sigma_b2: float = SIGMA_B2) -> float:
    """q* = sigma_w^2 E[tanh(sqrt(q*) z)^2] + sigma_b^2 (iterated to convergence)."""
    q = 1.0
    for _ in range(500):
        q, before = sigma_w2 * float(_WEIGHTS @ np.tanh(math.sqrt(q) * _NODES) ** 2) + sigma_b2, q
        if abs(q - before) <= 1e-13 * q:
            break
    return q


def depth_scale(sigma_w2: float, sigma_b2: float = SIGMA_B2) -> dict[str, float]:
    """Mean-field chi_1, c* and xi_c = -1 / ln chi_c (infinite at criticality).

    chi_c = sigma_w^2 E[tanh'(u1) tanh'(u2)] with (u1, u2) of variance q* and
    correlation c*, the fixed point of the correlation map (c* = 1 in the
    ordered phase, chi_1 < 1).
    """
    q = fixed_point_q(sigma_w2, sigma_b2)
    chi1 = sigma_w2 * float(_WEIGHTS @ _dtanh(math.sqrt(q) * _NODES) ** 2)
    z1, z2 = np.meshgrid(_NODES, _NODES, indexing="ij")
    w2 = np.outer(_WEIGHTS, _WEIGHTS)

    def pair(c: float) -> tuple[np.ndarray, np.ndarray]:  # (u1, u2): variance q, correlation c
        return math.sqrt(q) * z1, math.sqrt(q) * (c * z1 + math.sqrt(max(0.0, 1 - c * c)) * z2)

    def corr_map(c: float) -> float:
        u1, u2 = pair(c)
        return (sigma_w2 * float((w2 * np.tanh(u1) * np.tanh(u2)).sum()) + sigma_b2) / q

    c = 1.0
    if chi1 > 1:
        c = 0.5
        for _ in range(500):
            c, before = corr_map(c), c
            if abs(c - before) <= 1e-13:
                break
    u1, u2 = pair(c)
    chi_c = sigma_w2 * float((w2 * _dtanh(u1) * _dtanh(u2)).sum())
    xi = math.inf if abs(math.log(chi_c)) < 1e-12 else -1.0 / math.log(chi_c)
    return {"q_star": q, "chi_1": chi1, "c_star": c, "chi_c": chi_c, "xi_c": abs(xi)}


def critical_sigma_w2(sigma_b2: float = SIGMA_B2) -> float:
    """The sigma_w^2 where chi_1 = 1 (bisection)."""
    lo, hi = 1.0, 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if depth_scale(mid, sigma_b2)["chi_1"] < 1 else (lo, mid)
    return (lo + hi) / 2


def build(depth: int, sigma_w2: float, n_in: int, n_out: int, seed: int) -> nn.Sequential:
    """A tanh MLP, weights N(0, sigma_w^2 / fan_in), biases N(0, sigma_b^2)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k in range(depth + 1):
        a = n_in if k == 0 else WIDTH
        b = n_out if k == depth else WIDTH
        lin = nn.Linear(a, b)
        nn.init.normal_(lin.weight, 0.0, math.sqrt(sigma_w2 / a))
        nn.init.normal_(lin.bias, 0.0, math.sqrt(SIGMA_B2))
        layers.append(lin)
        if k < depth:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def preflight(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """gradmedic.check before training: trainable unless it finds vanishing or exploding."""
    found = sorted({str(f.problem) for f in gradmedic.check(model, x, y).findings})
    bad = [p for p in found if p in ("vanishing", "exploding")]
    return {"findings": found, "predicts_trainable": not bad}


@experiment(NAME, ["R4"], TITLE)
def run(config: LabConfig) -> Result:
    dataset = data.load(config.seed, config.mnist_dir)
    if dataset.name == "mnist":
        dataset = dataset.subset(config.pick(3000, 10000), 2000)
    sigmas = config.pick([1.0, 1.76, 3.0], [1.0, 1.3, 1.76, 2.4, 3.2])
    depths = config.pick([6, 30], [6, 12, 24, 48, 80])
    steps = config.pick(150, 250)
    crit = critical_sigma_w2()
    theory = {s: depth_scale(s) for s in sigmas}
    x0, y0 = dataset.x_train[:256], dataset.y_train[:256]
    cells = []
    for s in sigmas:
        for d in depths:
            model = build(d, s, dataset.n_features, dataset.n_classes, config.seed)
            pre = preflight(model, x0, y0)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            curves = train(model, dataset, opt, steps=steps, batch_size=BATCH, seed=config.seed)
            acc = curves.final_accuracy
            xi = theory[s]["xi_c"]
            cells.append(
                {
                    "sigma_w2": s,
                    "depth": d,
                    "test_accuracy": acc if math.isfinite(acc) else 0.0,
                    "diverged": curves.diverged,
                    "trained": bool(math.isfinite(acc) and acc >= LEARNED),
                    "theory_predicts_trainable": bool(d <= 6 * xi),
                    "preflight_predicts_trainable": pre["predicts_trainable"],
                    "preflight_findings": pre["findings"],
                }
            )
    n = len(cells)
    agree_theory = sum(c["trained"] == c["theory_predicts_trainable"] for c in cells) / n
    agree_check = sum(c["trained"] == c["preflight_predicts_trainable"] for c in cells) / n
    deep_critical = [
        c for c in cells if c["depth"] == max(depths) and abs(c["sigma_w2"] - crit) < 0.1
    ]
    checks = {
        f"the depth-scale rule (trainable iff depth <= 6 xi_c) matches training in >= "
        f"{AGREE:.0%} of the cells": agree_theory >= AGREE,
        f"gradmedic.check's preflight matches training in >= {AGREE:.0%} of the cells": (
            agree_check >= AGREE
        ),
        "at the critical point the deepest net trains": bool(deep_critical)
        and all(c["trained"] for c in deep_critical),
    }
    verdict = judge(checks)

    fig, (ax_p, ax_a) = plotting.figure(2, width=4.4)
    grid = np.array([[c["test_accuracy"] for c in cells if c["sigma_w2"] == s] for s in sigmas])
    sx, dy = np.asarray(sigmas, dtype=float), np.log(np.asarray(depths, dtype=float))
    x_edges = _edges(sx)
    y_edges = np.exp(_edges(dy))
    mesh = ax_p.pcolormesh(
        x_edges, y_edges, grid.T, cmap="viridis", vmin=0.0, vmax=1.0, rasterized=True
    )
    fig.colorbar(mesh, ax=ax_p, label="test accuracy")
    fine = np.linspace(x_edges[0], x_edges[-1], 80)
    xi_fine = np.array([depth_scale(s)["xi_c"] for s in fine])
    top = y_edges[-1]
    ax_p.plot(fine, np.minimum(xi_fine, top * 10), "--", color="C1", label="xi_c")
    ax_p.plot(fine, np.minimum(6 * xi_fine, top * 10), "-", color="C3", label="6 xi_c")
    ax_p.axvline(crit, color="0.3", linestyle=":", linewidth=1, label="critical point")
    _grid_axes(ax_p, x_edges, y_edges, sigmas, depths)
    ax_p.grid(False)
    plotting.label(
        ax_p, f"trained accuracy (critical sigma_w^2 = {crit:.2f})", "sigma_w^2", "depth"
    )
    shift = 0.06 * (x_edges[-1] - x_edges[0])
    for k, (key, name) in enumerate(
        (
            ("theory_predicts_trainable", "depth <= 6 xi_c"),
            ("preflight_predicts_trainable", "gradmedic.check"),
        )
    ):
        ok = np.array([c[key] == c["trained"] for c in cells])
        px = np.array([c["sigma_w2"] for c in cells]) + (k - 0.5) * shift
        py = np.array([c["depth"] for c in cells], dtype=float)
        ax_a.scatter(px[ok], py[ok], marker="o", s=40, color=f"C{k}", label=f"{name}: agrees")
        ax_a.scatter(px[~ok], py[~ok], marker="x", s=40, color=f"C{k}",
                     label=f"{name}: disagrees")  # fmt: skip
    _grid_axes(ax_a, x_edges, y_edges, sigmas, depths)
    plotting.label(ax_a, "predictions before training vs training", "sigma_w^2", "depth")

    return Result(
        setup=(
            f"{PAPER.cite}, Figure 5 (MNIST/CIFAR, depth up to 300). Here: tanh MLPs of width "
            f"{WIDTH} on {dataset.name}, weights N(0, sigma_w^2/fan_in), biases N(0, "
            f"{SIGMA_B2}), sigma_w^2 in {sigmas}, depth (hidden layers) in {depths}; SGD lr "
            f"{LR}, momentum {MOMENTUM}, batch {BATCH}, {steps} steps, seed {config.seed}; "
            f"'trained' = test accuracy >= {LEARNED}. Mean-field theory (Gauss-Hermite "
            "quadrature): q*, chi_1, c*, xi_c = -1/ln chi_c; critical sigma_w^2 where chi_1 = 1. "
            "Before training each net also goes through gradmedic.check (one batch of 256): it "
            "predicts 'trainable' unless it finds vanishing or exploding gradients."
        ),
        expected=(
            "Nets train to a depth of about 6 xi_c; xi_c diverges at sigma_w^2 about 1.76, so "
            "only near criticality do very deep tanh nets train."
        ),
        numbers={
            "dataset": dataset.name,
            "steps": steps,
            "critical_sigma_w2": crit,
            "theory": {f"sigma_w2_{i}": {"sigma_w2": s, **theory[s]} for i, s in enumerate(sigmas)},
            "cells": cells,
            "agreement": {"depth_scale_rule": agree_theory, "preflight_check": agree_check},
            "checks": checks,
        },
        rule=(
            f"Fixed before the run: a cell is trained when its test accuracy reaches {LEARNED}; "
            f"a prediction passes when it matches training in at least {AGREE:.0%} of the "
            "cells. One seed per cell: the diagram's contrast is between phases, not a small "
            "difference. Holds if all checks pass, partly if some do, does not hold if none do."
        ),
        verdict=verdict,
        explanation=(
            f"Critical sigma_w^2 = {crit:.3f} (the paper: about 1.76). xi_c: "
            + ", ".join(f"{s:g}: {theory[s]['xi_c']:.3g}" for s in sigmas)
            + f". The depth-scale rule agrees with training in {agree_theory:.0%} of "
            f"{n} cells, gradmedic.check in {agree_check:.0%}. "
            + "Cells where they disagree: "
            + (
                ", ".join(
                    f"(sigma_w^2 {c['sigma_w2']:g}, depth {c['depth']}: acc "
                    f"{c['test_accuracy']:.2f}, check {c['preflight_findings'] or 'no finding'})"
                    for c in cells
                    if c["trained"] != c["preflight_predicts_trainable"]
                )
                or "none"
            )
            + ". With few training steps a net near the boundary may train slowly rather than "
            "not at all: the diagram's edge is soft."
            + (
                " Quick run: a 3 x 2 grid away from the boundary, 150 steps; the full run's "
                "5 x 5 grid (depth to 80, close to the boundary) is the real test and its verdict "
                "can differ (the deepest critical net needs more steps than it gets there)."
                if config.quick
                else ""
            )
        ),
        figures={"phase_diagram": fig},
    )


def _grid_axes(
    ax: Any, x_edges: np.ndarray, y_edges: np.ndarray, sigmas: list, depths: list
) -> None:
    """The grid's axes: sigma_w^2 across, depth up on a log scale, ticks at the cells."""
    ax.set_yscale("log")
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    ax.set_xticks(sigmas, [f"{s:g}" for s in sigmas])
    ax.set_yticks(depths, [str(d) for d in depths])
    ax.minorticks_off()


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges around sorted ``centers``: midpoints, the ends half a gap out."""
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])
