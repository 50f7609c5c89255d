"""Clipping under the monitor: training bit-identical to the same loop unwatched.

Once a loop is seen clipping, the monitor's end-of-backward pass reads only the L2
norms (the post-clip max |g| is read at the record); the clip always computes its
own norms, so an edit of the gradients it cannot see (through ``.data``) changes
nothing. The record must hold the pre- and post-clip norms torch computes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmedic


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return model, opt, torch.randn(64, 16), torch.randn(64, 4)


def train(
    watched: bool, steps: int, clip: object, edit: object = None
) -> tuple[list[torch.Tensor], list, list]:
    model, opt, x, y = build()
    totals: list[torch.Tensor] = []
    mon = gradmedic.watch(model, opt) if watched else None
    try:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if edit is not None:
                edit(model)  # type: ignore[operator]
            totals.append(clip(model.parameters(), 0.05))  # type: ignore[operator]
            opt.step()
        rows = mon.history.rows() if mon is not None else []
    finally:
        if mon is not None:
            mon.close()
    return [p.detach().clone() for p in model.parameters()], totals, rows


def test_watched_clipping_is_bit_identical_to_unwatched_and_to_torch() -> None:
    bare, bare_totals, _ = train(False, 6, gradmedic.clip_grad_norm_)
    reference, torch_totals, _ = train(False, 6, torch.nn.utils.clip_grad_norm_)
    watched, totals, rows = train(True, 6, gradmedic.clip_grad_norm_)
    assert all(torch.equal(a, b) for a, b in zip(watched, bare, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(watched, reference, strict=True))
    assert (
        [float(t) for t in totals]
        == [float(t) for t in bare_totals]
        == [float(t) for t in torch_totals]
    )
    # The record holds torch's numbers: pre-clip total = the clip's, post-clip = max_norm.
    for row, total in zip(rows, totals, strict=True):
        assert row["clip"]["pre_norm"] == pytest.approx(float(total), rel=1e-6)
        assert row["global_grad_norm"] == pytest.approx(0.05, rel=1e-5)
        pre = math.sqrt(sum(v * v for v in row["pre_clip_grad_norm"].values()))
        assert pre == pytest.approx(float(total), rel=1e-6)


def test_after_a_clip_the_post_clip_max_is_read_and_an_unclipped_step_still_is_whole() -> None:
    model, opt, x, y = build()
    with gradmedic.watch(model, opt) as mon:
        for step in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step < 3:
                gradmedic.clip_grad_norm_(model.parameters(), 0.05)
            want = {n: float(p.grad.abs().max()) for n, p in model.named_parameters()}
            norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            opt.step()
            row = mon.history.rows()[-1]
            for layer in ("0", "2", "4"):
                mine = [v for n, v in want.items() if n.startswith(layer + ".")]
                assert row["grad_max"][layer] == max(mine)  # post-clip, exact
                l2 = math.sqrt(sum(v * v for n, v in norms.items() if n.startswith(layer + ".")))
                assert row["grad_norm"][layer] == pytest.approx(l2, rel=1e-5)
            assert ("clip" in row) == (step < 3)


def test_a_clip_of_some_parameters_gives_torchs_total() -> None:
    model, opt, x, y = build()
    with gradmedic.watch(model, opt):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            first = list(model[0].parameters())
            grads = [p.grad for p in first]
            want = torch.nn.utils.get_total_norm([g.clone() for g in grads])
            total = gradmedic.clip_grad_norm_(first, 0.01)
            assert float(total) == float(want)
            opt.step()


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m[2].weight.grad.data.mul_(100.0),  # .data: its own version counter
        lambda m: [p.grad.data.div_(3.0) for p in m.parameters()],  # manual averaging
        lambda m: m[2].weight.grad.zero_(),  # a middle gradient only
    ],
    ids=["data_mul_middle", "data_div_all", "zero_middle"],
)
def test_edits_between_backward_and_the_clip_change_nothing_watched(edit) -> None:
    bare, bare_totals, _ = train(False, 5, gradmedic.clip_grad_norm_, edit)
    watched, totals, _ = train(True, 5, gradmedic.clip_grad_norm_, edit)
    assert [float(t) for t in totals] == [float(t) for t in bare_totals]
    assert all(torch.equal(a, b) for a, b in zip(watched, bare, strict=True))
