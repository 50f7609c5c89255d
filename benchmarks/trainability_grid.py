"""Will it train? The preflight against training itself, on the trainability grid.

Tanh MLPs of width 128 on sklearn's digits, sigma_w^2 in 0.5..4 at sigma_b^2 = 0.05,
depth 5..80, 400 steps of SGD lr 0.01 and of SGD momentum 0.9 lr 0.01; "trains" =
test accuracy >= 0.5. Prints, per optimizer, the agreement with the outcome of the
6 xi_c depth rule, ``check()`` without the optimizer and ``check(..., optimizer=...)``,
and the false alarms (cells that train but were called untrainable); then the time of
one preflight with the optimizer of an 80-layer width-128 net.

    python benchmarks/trainability_grid.py            # 40 cells, ~6-10 min on 1 thread
    python benchmarks/trainability_grid.py --quick    # 8 cells, ~1 min
"""

from __future__ import annotations

import argparse
import time

import torch

from gradmedic.preflight import check
from gradmedic.trainability import OPTIMIZERS, agreement, false_alarms, run_cell, tanh_mlp

FULL = {"depths": (5, 10, 20, 40, 80), "sw2": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)}
QUICK = {"depths": (10, 40), "sw2": (0.5, 1.5, 2.5, 4.0)}
PREDICTORS = {"6 xi_c rule": "depth_rule", "check()": "check", "check(optimizer)": "check_with"}


def preflight_seconds(depth: int = 80, repeats: int = 3) -> float:
    """Median wall time of one ``check(..., optimizer=SGD momentum)`` on a depth-80 net."""
    from gradmedic.lab.data import digits

    data = digits(0)
    model = tanh_mlp(depth, 2.0)
    xb, yb = data.x_train[:256], data.y_train[:256]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        check(model, xb, yb, optimizer=OPTIMIZERS["momentum"])
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Run the grid and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 cells instead of 40")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    cells = []
    start = time.perf_counter()
    print("depth  sw2   acc sgd  acc mom  6xi_c  check  check(sgd)  check(mom)  sharp/limit(mom)")
    for depth in grid["depths"]:
        for sw2 in grid["sw2"]:
            c = run_cell(depth, sw2)
            cells.append(c)
            s = c.step_size["momentum"]
            ratio = s.get("sharpness_trial", float("nan")) / s.get("limit", {}).get("limit", 1.0)
            print(
                f"{depth:5d}  {sw2:3.1f}  {c.accuracy['sgd']:7.2f}  {c.accuracy['momentum']:7.2f}"
                f"  {'T' if c.depth_rule else 'F':>5}  {'T' if c.check else 'F':>5}"
                f"  {'T' if c.check_with['sgd'] else 'F':>10}  "
                f"{'T' if c.check_with['momentum'] else 'F':>10}  {ratio:10.3g}",
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
    print(
        f"\none check(..., optimizer=momentum) of an 80-layer width-128 net: "
        f"{preflight_seconds():.2f} s (median of 3, {args.threads} thread)"
    )


if __name__ == "__main__":
    main()
