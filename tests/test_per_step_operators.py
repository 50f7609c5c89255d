"""The monitor's fixed cost per step, counted in dispatched operators (not timed).

Step times on a shared machine swing by several percent; the number of torch
operators the monitor adds to a step does not, and on CPU each costs a few
microseconds whatever its size. A per-layer Python loop would add operators in
proportion to depth; gradmedic's per-step path must not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from compare import depth
from operator_counts import CONFIGS, extra_per_step, operators_per_step

from gradmedic.probes.rotation import PER_STEP

NORMS_ONLY = CONFIGS["norms only"]


def thin(layers: int):
    return depth(layers, width=8, batch=4)  # compare.py's thin net; operator counts ignore width


def test_the_counter_counts_a_known_step_exactly() -> None:
    # one Linear(8, 8) step: the count is what torch dispatches, so it is stable across runs
    first = operators_per_step(thin(2), None, steps=2, warmup=1)
    second = operators_per_step(thin(2), None, steps=2, warmup=1)
    assert first == second and first["aten.addmm"] == 2  # one forward per step


def test_gradient_norms_add_the_same_operators_at_every_depth() -> None:
    extra = {n: extra_per_step(thin(n), NORMS_ONLY, steps=3) for n in (10, 1000)}
    assert 0 < extra[10] <= 40  # a few fused reductions, not one per parameter
    assert extra[1000] - extra[10] <= 4  # 1000 parameters of 500 layers: flat


def test_the_default_monitor_is_bounded_by_its_per_step_share_not_by_depth() -> None:
    # deltas hook at most PER_STEP layers per step (every k-th of 100 or 500 Linear layers)
    default = CONFIGS["default `watch()`"]
    extra = {n: extra_per_step(thin(n), default, steps=3) for n in (200, 1000)}
    assert extra[1000] <= 8 * PER_STEP < 500  # fewer than one operator per Linear layer
    assert extra[1000] <= 1.5 * extra[200]  # 5x the layers; a per-layer cost would be 5x
