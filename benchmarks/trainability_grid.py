"""Will it train? The preflight against training itself, on the trainability grid.

Tanh MLPs of width 128 on sklearn's digits, sigma_w^2 in 0.5..4 at sigma_b^2 = 0.05,
depth 5..80, 400 steps of SGD lr 0.01 and of SGD momentum 0.9 lr 0.01; "trains" =
test accuracy >= 0.5. Prints, per optimizer, the agreement with the outcome of the
6 xi_c depth rule, ``check()`` without the optimizer and ``check(..., optimizer=...)``,
and the false alarms (cells that train but were called untrainable); then the time of
one preflight with the optimizer of an 80-layer width-128 net.

    python benchmarks/trainability_grid.py            # 40 cells, ~30 min on 1 thread
    python benchmarks/trainability_grid.py --quick    # 8 cells
    python benchmarks/trainability_grid.py --seed 1 --outcomes /tmp/grid-seed1.json

Training outcomes are deterministic per seed: ``--outcomes FILE`` writes each cell's
test-accuracy curve under both optimizers to FILE (JSON) and reuses the cells it
already holds, so the predictors can be re-scored without retraining the grid
(``--train-only`` fills the file and skips the predictions).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from gradmedic.preflight import check
from gradmedic.trainability import (
    OPTIMIZERS,
    agreement,
    false_alarms,
    run_cell,
    tanh_mlp,
    train_cell,
)

FULL = {"depths": (5, 10, 20, 40, 80), "sw2": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)}
QUICK = {"depths": (10, 40), "sw2": (0.5, 1.5, 2.5, 4.0)}
PREDICTORS = {"6 xi_c rule": "depth_rule", "check()": "check", "check(optimizer)": "check_with"}


def preflight_seconds(depth: int = 80, repeats: int = 3) -> dict[str, float]:
    """Median wall times on a depth-80 net (sigma_w^2 2.0, which stalls: a full trial).

    ``check()`` alone, ``check(..., optimizer=SGD momentum)``, and one training step of
    batch 64 measured in the same run (the trial's unit of cost).
    """
    from gradmedic.lab.data import digits

    data = digits(0)
    model = tanh_mlp(depth, 2.0)
    xb, yb = data.x_train[:256], data.y_train[:256]

    def median(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    net = copy.deepcopy(model)
    opt = OPTIMIZERS["momentum"](net.parameters())

    def ten_steps() -> None:
        for _ in range(10):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb[:64]), yb[:64]).backward()
            opt.step()

    return {
        "check": median(lambda: check(model, xb, yb)),
        "check_optimizer": median(lambda: check(model, xb, yb, optimizer=OPTIMIZERS["momentum"])),
        "step": median(ten_steps) / 10,
    }


def print_timing(threads: int) -> None:
    """Print :func:`preflight_seconds`."""
    t = preflight_seconds()
    print(
        f"\n80-layer width-128 net, {threads} thread(s), median of 3: check(..., "
        f"optimizer=momentum) {t['check_optimizer']:.2f} s; check() alone {t['check']:.2f} s; "
        f"one training step of batch 64 {1e3 * t['step']:.1f} ms"
    )


class Outcomes:
    """Per-cell training curves, read from and written to a JSON file (or kept in memory)."""

    def __init__(self, path: str | None, seed: int, steps: int) -> None:
        self.path = Path(path) if path else None
        self.key = {"seed": seed, "steps": steps}
        self.cells: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            if {k: data.get(k) for k in self.key} != self.key:
                raise SystemExit(
                    f"{self.path} holds another run ({data.get('seed')=}, "
                    f"{data.get('steps')=}): pass a new --outcomes file"
                )
            self.cells = data["cells"]

    def curves(self, depth: int, sw2: float) -> dict[str, list[list[float]]]:
        """The cell's test-accuracy curves per optimizer, training it if not cached."""
        name = f"{depth},{sw2}"
        if name not in self.cells:
            steps, seed = self.key["steps"], self.key["seed"]
            self.cells[name] = train_cell(depth, sw2, steps=steps, seed=seed)
            if self.path is not None:
                self.path.write_text(json.dumps({**self.key, "cells": self.cells}))
        return self.cells[name]


def main() -> None:
    """Run the grid and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 cells instead of 40")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="data split, init and batch order")
    parser.add_argument("--outcomes", help="JSON file of training curves to write/reuse")
    parser.add_argument("--train-only", action="store_true", help="only fill --outcomes")
    parser.add_argument("--no-timing", action="store_true", help="skip the 80-layer timing")
    parser.add_argument("--record", help="write each cell's step judgement (JSON) to this file")
    parser.add_argument("--timing-only", action="store_true", help="only the 80-layer timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing_only:
        print_timing(args.threads)
        return
    grid = QUICK if args.quick else FULL
    outcomes = Outcomes(args.outcomes, args.seed, 400)
    cells = []
    start = time.perf_counter()
    if args.train_only:
        for depth in grid["depths"]:
            for sw2 in grid["sw2"]:
                acc = {k: v[-1][1] for k, v in outcomes.curves(depth, sw2).items()}
                print(depth, sw2, acc, f"{time.perf_counter() - start:.0f} s", flush=True)
        return
    print(f"seed {args.seed}")
    print("depth  sw2   acc sgd  acc mom  6xi_c  check  check(sgd)  check(mom)  why (sgd / mom)")
    for depth in grid["depths"]:
        for sw2 in grid["sw2"]:
            acc = {k: v[-1][1] for k, v in outcomes.curves(depth, sw2).items()}
            c = run_cell(depth, sw2, seed=args.seed, outcomes=acc)
            cells.append(c)
            if args.record:
                record = {
                    f"{x.depth},{x.sw2}": {**x.step_size, "acc": x.accuracy, "check": x.check}
                    for x in cells
                }
                Path(args.record).write_text(json.dumps(record))
            why = " / ".join(c.step_size[n].get("verdict", "-") for n in OPTIMIZERS)
            print(
                f"{depth:5d}  {sw2:3.1f}  {c.accuracy['sgd']:7.2f}  {c.accuracy['momentum']:7.2f}"
                f"  {'T' if c.depth_rule else 'F':>5}  {'T' if c.check else 'F':>5}"
                f"  {'T' if c.check_with['sgd'] else 'F':>10}  "
                f"{'T' if c.check_with['momentum'] else 'F':>10}  {why}",
                flush=True,
            )
    print(f"\n{len(cells)} cells in {time.perf_counter() - start:.0f} s (T: trains / predicted)")
    print(f"{'optimizer':10} {'trains':>6}  " + "  ".join(f"{p:>22}" for p in PREDICTORS))
    for name in OPTIMIZERS:
        trains = sum(c.trains(name) for c in cells)
        row = [
            f"{agreement(cells, name, key):6.1%} ({false_alarms(cells, name, key)} false al.)"
            for key in PREDICTORS.values()
        ]
        print(f"{name:10} {trains:6d}  " + "  ".join(f"{r:>22}" for r in row))
    if not args.no_timing:
        print_timing(args.threads)


if __name__ == "__main__":
    main()
