"""Bounded memory: update copies stay within budget, nothing grows with steps or dropped layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.layers import SEGMENT_CACHE
from gradmedic.probes import updates


def deep(n: int = 30, width: int = 32) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(width, width), nn.Tanh())])


def _held_during_steps(probe: updates.UpdateProbe) -> list[int]:
    """Elements of the copy each measurement holds across the optimizer step (appended)."""
    held: list[int] = []
    after = probe.after

    def measured_after() -> None:
        held.append(sum(t.numel() for t in probe._snapshot or []))
        after()

    probe.after = measured_after  # type: ignore[method-assign]
    return held


@pytest.mark.parametrize("segments", [0, updates.FOREACH_SEGMENTS], ids=["segmented", "sliced"])
def test_update_copies_stay_within_budget_and_cover_every_layer(monkeypatch, segments) -> None:
    monkeypatch.setattr(updates, "BUDGET_FLOOR", 1)  # the 5% rule alone, on a small model
    monkeypatch.setattr(updates, "FOREACH_SEGMENTS", segments)  # both ways of summing
    torch.manual_seed(0)
    model = deep()
    total = sum(p.numel() for p in model.parameters())
    budget = math.ceil(updates.BUDGET_FRACTION * total)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 32)
    seen: set[str] = set()
    with gradmedic.watch(model, opt, update_every=1) as mon:
        probe = mon._updates
        held = _held_during_steps(probe)
        for _ in range(len(probe.groups()) + 1):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            after = {n: p.detach() for n, p in model.named_parameters()}
            want = {  # ||w_after - w_before|| per layer, by hand in float64
                str(i): math.sqrt(
                    sum(
                        float(
                            (after[f"{i}.{k}"].double() - before[f"{i}.{k}"].double())
                            .square()
                            .sum()
                        )
                        for k in ("weight", "bias")
                    )
                )
                for i in range(0, 60, 2)
            }
            assert 0 < held[-1] <= budget  # elements held across the optimizer step
            row = mon.history.rows()[-1]
            for layer, value in row["update_norm"].items():
                assert value == pytest.approx(want[layer], rel=1e-4)
                w = (
                    before[f"{layer}.weight"].double().square().sum()
                    + before[f"{layer}.bias"].double().square().sum()
                )
                assert row["param_norm"][layer] == pytest.approx(math.sqrt(float(w)), rel=1e-6)
            seen.update(row["update_norm"])
    assert seen == {str(i) for i in range(0, 60, 2)}  # every layer measured in one round


def test_a_layer_larger_than_the_budget_is_sampled_not_copied(monkeypatch) -> None:
    monkeypatch.setattr(updates, "BUDGET_FLOOR", 1)
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        held = _held_during_steps(mon._updates)
        opt.zero_grad()
        model(torch.randn(8, 200)).sum().backward()
        g = math.sqrt(
            float(
                model[0].weight.grad.double().square().sum()
                + model[0].bias.grad.double().square().sum()
            )
        )
        opt.step()
        (size,) = held
    total = sum(p.numel() for p in model.parameters())
    assert (
        size <= math.ceil(updates.BUDGET_FRACTION * total) + 2
    )  # one element per parameter at most over
    row = mon.history.rows()[0]
    # a strided sample of a dense gradient: the estimate is close to the exact 0.1 * ||g||
    assert row["update_norm"]["0"] == pytest.approx(0.1 * g, rel=0.1)


def test_history_and_caches_do_not_grow_with_steps_or_dropped_layers() -> None:
    torch.manual_seed(0)
    model = deep(12, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with gradmedic.watch(model, opt, history=50) as mon:
        for _ in range(300):
            opt.zero_grad(set_to_none=True)
            keep = torch.rand(12, generator=gen) < 0.5  # layer drop: a random subset runs
            h = torch.randn(4, 8)
            for k in range(12):
                if keep[k]:
                    h = model[2 * k + 1](model[2 * k](h))
            h.sum().backward()
            opt.step()
        assert len(mon.history._records) < 50 + 50
        assert len(mon.history) == 50 and mon.history.total == 300
        assert len(mon.index._segment_cache) <= SEGMENT_CACHE
        rows = mon.history.rows()
    assert [r["step"] for r in rows] == list(range(250, 300))


def test_the_first_nonfinite_step_survives_eviction_unread() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    with gradmedic.watch(model, history=8) as mon:
        for step in range(60):
            model.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            if step == 3:
                model[2].bias.grad[0] = float("nan")  # the last gradient: the snapshot sees it
            mon.step()
        assert len(mon.history) == 8  # step 3 left the history unread
        assert mon.first_nonfinite == {"layer": "2", "where": "gradient", "step": 3}
