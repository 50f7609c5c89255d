"""The fused per-tensor reduction against torch, one tensor at a time, on every path it takes."""

from __future__ import annotations

import math

import pytest
import torch

from gradmedic.tensorlists import BACK_TO_BACK, STACK_NUMEL, norms_and_maxes, reduce_plan

CPU = torch.device("cpu")


def mixed_list() -> list[torch.Tensor]:
    """Interleaved shapes (several stacks, a gather), large ones, a 0-d, an empty one."""
    torch.manual_seed(0)
    return [
        torch.randn(32, 32),
        torch.randn(32),
        torch.randn(4096, 8),  # a large one (> STACK_NUMEL), fused norm
        torch.randn(32, 32) * 1e-3,
        torch.tensor(-7.5),  # 0-d: a stack of scalars
        torch.randn(BACK_TO_BACK + 3),  # norm, max and min back to back
        torch.randn(32) - 5.0,  # all negative: max |t| is -min
        torch.tensor(2.0),
        torch.empty(0),
        torch.randn(300, 300),  # a stack above the |t| temporary's size
        torch.randn(300, 300),
    ]


def reference(tensors: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    l2 = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    amax = [float(t.double().abs().max()) if t.numel() else 0.0 for t in tensors]
    return l2, amax


def test_every_path_gives_each_tensors_norm_and_max_in_input_order() -> None:
    tensors = mixed_list()
    plan = reduce_plan(tensors, CPU)
    assert plan.order is not None and len(plan.stacks) >= 3 and plan.large  # all paths taken
    assert any(tensors[i].numel() > STACK_NUMEL for i in plan.large)
    l2, amax = norms_and_maxes(tensors, CPU, plan=plan)
    want_l2, want_max = reference(tensors)
    assert l2 is not None and l2.shape == amax.shape == (len(tensors),)
    assert l2.tolist() == pytest.approx(want_l2, rel=1e-5)
    assert amax.tolist() == want_max  # a maximum is exact in any dtype
    only_max = norms_and_maxes(tensors, CPU, norms=False, plan=plan)
    assert only_max[0] is None and only_max[1].tolist() == want_max


def test_one_group_in_input_order_and_a_float64_tensor() -> None:
    same = [torch.randn(8, 8) for _ in range(5)]
    assert reduce_plan(same, CPU).order is None
    l2, amax = norms_and_maxes(same, CPU)
    assert l2 is not None
    want_l2, want_max = reference(same)
    assert l2.tolist() == pytest.approx(want_l2, rel=1e-6) and amax.tolist() == want_max
    wide = [torch.randn(16), torch.randn(16, 16, dtype=torch.float64) * 1e200]
    l2, amax = norms_and_maxes(wide, CPU)
    assert l2 is not None and l2.dtype == amax.dtype == torch.float64  # promoted, not overflowed
    assert l2.tolist() == pytest.approx(reference(wide)[0], rel=1e-6)


def test_half_precision_is_summed_in_float32_and_nan_propagates() -> None:
    torch.manual_seed(1)
    big = torch.full((64,), 300.0, dtype=torch.float16)  # sum of squares overflows in half
    tensors = [big, torch.randn(16, 16).half(), torch.randn(20000).half()]
    l2, amax = norms_and_maxes(tensors, CPU)
    assert l2 is not None and math.isfinite(l2[0].item())
    assert l2.tolist() == pytest.approx(reference(tensors)[0], rel=1e-3)
    assert amax.tolist() == reference(tensors)[1]
    poisoned = [t.clone() for t in mixed_list()]
    poisoned[1][3] = math.nan
    poisoned[5][7] = math.nan
    l2, amax = norms_and_maxes(poisoned, CPU)
    assert l2 is not None
    pairs = enumerate(zip(l2.tolist(), amax.tolist(), strict=True))
    bad = [i for i, (n, m) in pairs if n != n or m != m]
    assert bad == [1, 5]


def test_shapes_no_other_tensor_has_go_with_the_large_ones_unless_alone() -> None:
    torch.manual_seed(2)
    lone = [torch.randn(10, 3)]
    assert reduce_plan(lone, CPU).stacks == ((0,),) and not reduce_plan(lone, CPU).large
    singles = [torch.randn(10, 3), torch.randn(7) - 3.0, torch.randn(5, 5, 2)]
    plan = reduce_plan(singles, CPU)
    assert not plan.stacks and plan.large == (0, 1, 2) and plan.order is None
    mixed = [torch.randn(9, 9), torch.randn(6), torch.randn(9, 9), torch.randn(STACK_NUMEL + 1)]
    plan = reduce_plan(mixed, CPU)
    assert plan.stacks == ((0, 2),) and plan.large == (1, 3)
    for tensors in (lone, singles, mixed):
        l2, amax = norms_and_maxes(tensors, CPU)
        want_l2, want_max = reference(tensors)
        assert l2 is not None and l2.tolist() == pytest.approx(want_l2, rel=1e-5)
        assert amax.tolist() == want_max
