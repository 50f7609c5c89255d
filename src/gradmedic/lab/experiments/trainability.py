"""K6: does the preflight that knows the optimizer predict which nets train?

Per cell of the trainability grid (:mod:`gradmedic.trainability`: tanh MLPs of
width 128 on digits, sigma_b^2 = 0.05): the outcome under SGD lr 0.01 and SGD
momentum 0.9 lr 0.01 (400 steps, trains = test accuracy >= 0.5), the 6 xi_c
depth rule, ``check()`` without and with the optimizer; the agreement of each.
"""

from __future__ import annotations

from gradmedic.lab import plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge
from gradmedic.trainability import OPTIMIZERS, agreement, false_alarms, run_cell

NAME = "trainability"
TITLE = "Will it train? check() with the optimizer against training on a depth x sigma_w^2 grid"
PREDICTORS = {"depth_rule": "6 xi_c rule", "check": "check()", "check_with": "check(optimizer)"}
TARGET = 0.95
#: (depth, sigma_w^2) cells: a subset of benchmarks/trainability_grid.py's 40, sized to the
#: lab's time budget (the full grid takes minutes).
QUICK = ((5, 1.0), (20, 0.5))
FULL = ((10, 0.5), (10, 2.5), (40, 0.5), (40, 2.5), (40, 4.0))


@experiment(NAME, claims=["K6"], title=TITLE)
def run(config: LabConfig) -> Result:
    """Train each cell under both optimizers and score the three predictions."""
    grid = config.pick(QUICK, FULL)
    cells = [run_cell(d, s, seed=config.seed) for d, s in grid]
    table = {
        name: {
            key: {
                "agreement": agreement(cells, name, key),
                "false_alarms": false_alarms(cells, name, key),
            }
            for key in PREDICTORS
        }
        for name in OPTIMIZERS
    }
    checks = {
        f"check(optimizer) agrees with training in >= {TARGET:.0%} of cells under {name}": (
            table[name]["check_with"]["agreement"] >= TARGET
        )
        for name in OPTIMIZERS
    }
    checks["check(optimizer) calls no cell that trains untrainable"] = all(
        table[name]["check_with"]["false_alarms"] == 0 for name in OPTIMIZERS
    )
    fig, axes = plotting.figure(len(OPTIMIZERS), width=4.2)
    for ax, name in zip(axes, OPTIMIZERS, strict=True):
        for k, key in enumerate(PREDICTORS):
            ax.bar(k, table[name][key]["agreement"], color=f"C{k}")
        ax.set_xticks(range(len(PREDICTORS)), list(PREDICTORS.values()))
        plotting.label(ax, name, "", "agreement with training")
    per_cell = [
        {
            "depth": c.depth,
            "sigma_w2": c.sw2,
            "accuracy": c.accuracy,
            "depth_rule": c.depth_rule,
            "check": c.check,
            "check_with": c.check_with,
            "verdict": {name: c.step_size[name].get("verdict") for name in OPTIMIZERS},
            "step_size": c.step_size,
        }
        for c in cells
    ]
    return Result(
        setup=(
            f"Cells (depth, sigma_w^2) {list(grid)} (sigma_b^2 0.05, width 128, "
            "digits, 400 steps, batch 64), each trained by " + ", ".join(OPTIMIZERS) + "; "
            "check() on 256 training examples; with the optimizer also up to 300 trial steps of "
            "it on a copy (minibatches of 64 of those examples), judged by whether the loss "
            "stalls above half of where it started, with the top Hessian eigenvalue (Lanczos) "
            "against the stability limit as evidence."
        ),
        expected=(
            "Too long a step overshoots and too short a one does not move (K6): a trial run of "
            "the optimizer on a copy predicts the outcome under each optimizer."
        ),
        numbers={"agreement": table, "cells": per_cell, "checks": checks},
        rule=(
            "agreement = share of cells where the prediction (healthy = trains) matches "
            "test accuracy >= 0.5; false_alarms = cells that train but were predicted not to. "
            "All checks pass: holds; some: holds partly; none: does not hold."
        ),
        verdict=judge(checks),
        explanation="; ".join(
            f"{name}: "
            + ", ".join(
                f"{label} {table[name][key]['agreement']:.0%}" for key, label in PREDICTORS.items()
            )
            for name in OPTIMIZERS
        )
        + ". Nets that learn and then fall back late in training are predicted as trials "
        "show them, which is not always as training does.",
        figures={"agreement": fig},
    )
