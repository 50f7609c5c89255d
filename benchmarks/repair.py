"""Ranked repair search versus random remedies, on the broken setups built from the claims.

AUTOTRAINER (Keras) repaired 97% of 262 buggy models at about 1.2x training time,
but Kim et al. (ICST 2023) showed a search picking remedies at random did as
well. This script runs gradmedic's ranked search and a random-remedy search
(uniformly random compatible combinations of 1-3 remedies from the whole catalog,
same budget, same acceptance rule) on each broken setup of
``gradmedic.autorepair.examples.BROKEN`` for several seeds, and prints:

- success rate (a candidate was accepted: no findings, it trains, metric no worse)
  within ``max_candidates`` trained candidates, and within 1, 2, ... (the searches
  are sequential, so success within k is read off the same runs);
- candidates trained until success (a failure counts as ``max_candidates``);
- total search time in units of one training run (the original's run included;
  the ranked search's preflight screening is included in its time).

Run:  python benchmarks/repair.py [--seeds 5] [--steps 200] [--max-candidates 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradmedic.autorepair import Budget, repair
from gradmedic.autorepair.examples import BROKEN


def run(name: str, strategy: str, seed: int, steps: int, max_candidates: int) -> dict:
    result = repair(
        BROKEN[name](),
        budget=Budget(steps=steps, seconds=120.0),
        seed=seed,
        max_candidates=max_candidates,
        strategy=strategy,
    )
    tried = result.trained_candidates if result.repaired else max_candidates
    return {
        "healthy": result.status == "healthy",
        "success": result.repaired,
        "candidates": tried,
        "runs": result.runs,
        "metric": result.accepted.metric if result.accepted else float("nan"),
        "remedies": " + ".join(result.accepted.names) if result.accepted else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-candidates", type=int, default=4)
    parser.add_argument("--setups", nargs="*", default=list(BROKEN))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = {s: [] for s in ("ranked", "random")}
    print(f"{'setup':18} {'strategy':8} {'seed':>4} {'ok':>3} {'cands':>5} {'runs':>6}  remedies")
    for name in args.setups:
        for seed in range(args.seeds):
            for strategy in ("ranked", "random"):
                r = run(name, strategy, seed, args.steps, args.max_candidates)
                if r["healthy"]:  # not broken at this seed: nothing to compare
                    print(f"{name:18} {strategy:8} {seed:>4}  original healthy, skipped")
                    continue
                rows[strategy].append(r)
                print(
                    f"{name:18} {strategy:8} {seed:>4} {'yes' if r['success'] else 'no':>3} "
                    f"{r['candidates']:>5} {r['runs']:>6.1f}  {r['remedies']}",
                    flush=True,
                )
    print()
    ks = range(1, args.max_candidates + 1)
    within = " ".join(f"{f'<={k}':>5}" for k in ks)
    print(
        f"{'strategy':8} {'success':>8} {'candidates':>10} {'search time (runs)':>19}  "
        f"success within k candidates: {within}"
    )
    summary = {}
    for strategy, rs in rows.items():
        summary[strategy] = (
            sum(r["success"] for r in rs) / len(rs),
            statistics.mean(r["candidates"] for r in rs),
            statistics.mean(r["runs"] for r in rs),
        )
        rate, cands, runs = summary[strategy]
        curve = " ".join(
            f"{sum(r['success'] and r['candidates'] <= k for r in rs) / len(rs):>5.0%}" for k in ks
        )
        print(f"{strategy:8} {rate:>8.0%} {cands:>10.2f} {runs:>19.2f}  {' ' * 29}{curve}")
    (rr, rc, _), (qr, qc, _) = summary["ranked"], summary["random"]
    print(
        f"\nranked vs random: success {rr:.0%} vs {qr:.0%}, candidates {rc:.2f} vs {qc:.2f} "
        f"({len(args.setups)} setups x {args.seeds} seeds, {args.steps} steps, "
        f"max {args.max_candidates} candidates; {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
