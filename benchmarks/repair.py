"""Ranked repair (successive halving) versus random remedies, at equal compute.

AUTOTRAINER (Keras) repaired 97% of 262 buggy models, but Kim et al. (ICST 2023)
showed a search picking remedies at random did as well. This script runs
gradmedic's ranked search and a random-remedy search (uniformly random
compatible combinations of 1-3 catalog remedies, each trained at full length)
on every setup of ``gradmedic.autorepair.examples.SUITE`` for several seeds and
compute budgets. Compute is counted in training steps, not candidates: a budget
of ``k`` runs is ``k x steps`` steps, which the ranked search spends on many
short runs and a few full ones, the random search on ``k`` full runs (a
preflight screening counts one step). Both use the same acceptance rule: a
full-length run, healthy, clearly better than the trivial predictor.

Per strategy and budget it prints: success (a fix was accepted), the share of
searches whose fix reaches accuracy >= 0.8 (digits setups; the RNN's metric is
a loss), the mean accuracy of the accepted fixes, the mean accuracy of the model
the search hands back (the fix, else the original; NaN counts as 0), and the
steps spent. The original's run is shared by the searches of a setup and seed.

Run:  python benchmarks/repair.py [--seeds 5] [--steps 120] [--budgets 2 4] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from gradmedic.autorepair import Budget, train
from gradmedic.autorepair.examples import SUITE
from gradmedic.autorepair.search import _Search

GOOD = 0.8


def search(name: str, strategy: str, seed: int, steps: int, runs: int, original) -> dict:
    setup = SUITE[name]()
    result = _Search(
        setup, Budget(steps=steps, seconds=120.0), seed, runs, strategy, None, original
    ).run()
    metric = result.accepted.metric if result.accepted else float("nan")
    accuracy = setup.resolved_metric.name == "accuracy"
    handed = metric if result.accepted else result.original.metric
    return {
        "setup": name,
        "healthy": result.status == "healthy",
        "success": result.repaired,
        "accuracy": accuracy,
        "metric": metric,
        "handed": 0.0 if accuracy and not math.isfinite(handed) else handed,
        "spent": result.steps_spent,
        "remedies": " + ".join(result.accepted.names) if result.accepted else "-",
    }


def mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.mean(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--budgets", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--setups", nargs="*", default=list(SUITE))
    parser.add_argument("--quick", action="store_true", help="1 seed, budget 2, 60 steps")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budgets, args.steps = 1, [2], 60
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: dict[tuple[str, int], list[dict]] = {}
    print(
        f"{'setup':20} {'strategy':8} {'runs':>4} {'seed':>4} {'ok':>3} {'metric':>7} "
        f"{'steps':>5}  remedies"
    )
    for name in args.setups:
        for seed in range(args.seeds):
            original = train(
                SUITE[name](), budget=Budget(steps=args.steps, seconds=120.0), seed=seed
            )
            for runs in args.budgets:
                for strategy in ("ranked", "random"):
                    r = search(name, strategy, seed, args.steps, runs, original)
                    if r["healthy"]:
                        print(f"{name:20} {strategy:8} {runs:>4} {seed:>4}  original healthy")
                        continue
                    rows.setdefault((strategy, runs), []).append(r)
                    print(
                        f"{name:20} {strategy:8} {runs:>4} {seed:>4} "
                        f"{'yes' if r['success'] else 'no':>3} {r['metric']:>7.4g} "
                        f"{r['spent']:>5}  {r['remedies']}",
                        flush=True,
                    )
    print()
    print(
        f"{'strategy':8} {'runs':>4} {'searches':>8} {'success':>8} {'acc>=0.8':>8} "
        f"{'fix acc':>8} {'handed acc':>10} {'steps':>8}"
    )
    for (strategy, runs), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = [r for r in rs if r["accuracy"]]
        good = sum(r["success"] and r["metric"] >= GOOD for r in acc) / max(1, len(acc))
        print(
            f"{strategy:8} {runs:>4} {len(rs):>8} {sum(r['success'] for r in rs) / len(rs):>8.0%} "
            f"{good:>8.0%} {mean([r['metric'] for r in acc]):>8.3f} "
            f"{mean([r['handed'] for r in acc]):>10.3f} {mean([r['spent'] for r in rs]):>8.0f}"
        )
    print(
        f"\n({len(args.setups)} setups x {args.seeds} seeds, {args.steps} steps a full run, "
        f"budgets {args.budgets} full runs; {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
