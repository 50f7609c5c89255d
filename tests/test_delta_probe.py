"""Deltas reduced as they arrive (large outputs) and held for one fused reduction (small ones)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.probes import deltas as delta_module


def wide_then_thin() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 5000),  # output 20 x 5000: above HOLD_NUMEL, reduced in its hook
        nn.Tanh(),
        nn.Linear(5000, 8),  # small outputs: held until the step is collected
        nn.Tanh(),
        nn.Linear(8, 8),
    ).double()


def reference(model: nn.Sequential, xs: list[torch.Tensor]) -> tuple[dict, dict]:
    """Per layer: sqrt(sum over micro-batches of ||dL/d out||^2), and max |out| over them."""
    squares = dict.fromkeys(("0", "2", "4"), 0.0)
    peak: dict[str, float] = {}
    for x in xs:
        h0 = model[0](x)
        h2 = model[2](model[1](h0))
        h4 = model[4](model[3](h2))
        grads = torch.autograd.grad(h4.pow(2).mean(), [h0, h2, h4])
        for name, h, g in zip(("0", "2", "4"), (h0, h2, h4), grads, strict=True):
            squares[name] += float(g.pow(2).sum())
            peak[name] = max(peak.get(name, 0.0), float(h.detach().abs().max()))
    return {k: math.sqrt(v) for k, v in squares.items()}, peak


@pytest.mark.parametrize("budget", [delta_module.HOLD_BUDGET, 10])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_held_and_immediate_deltas_match_autograd_in_input_order(
    monkeypatch, budget: int, micro_batches: int
) -> None:
    monkeypatch.setattr(delta_module, "HOLD_BUDGET", budget)  # 10: reduced at every arrival
    model = wide_then_thin()
    torch.manual_seed(1)
    xs = [torch.randn(20, 16, dtype=torch.float64) for _ in range(micro_batches)]
    assert 20 * 5000 > delta_module.HOLD_NUMEL >= 20 * 8
    want_delta, want_peak = reference(model, xs)
    with gradmedic.watch(model, updates=False) as mon:
        for x in xs:
            model(x).pow(2).mean().backward()
        mon.step()
        held = mon.probes[[p.name for p in mon.probes].index("deltas")]._held
    assert held == []  # nothing outlives the step
    row = mon.history.rows()[0]
    assert list(row["delta_norm"]) == ["0", "2", "4"]
    for name, value in want_delta.items():
        assert row["delta_norm"][name] == pytest.approx(value, rel=1e-9), name
    assert row["output_max"] == pytest.approx(want_peak, rel=0, abs=0)  # maxima are exact
