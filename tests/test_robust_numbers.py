"""Norms neither overflow nor underflow in the gradient's dtype: finite is finite, zero is zero."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmedic


@pytest.mark.parametrize("scale", [1e28, 1e-26, 1e-40])
def test_extreme_but_finite_gradients_keep_their_norms(scale: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(8, 64)
    with gradmedic.watch(model) as mon:
        (model(x).sum() * scale).backward()
        mon.step()
    row = mon.history.rows()[0]
    # The same gradients' norms in float64, by hand.
    exact = {
        layer: math.sqrt(
            sum(
                float(p.grad.double().square().sum())
                for name, p in model.named_parameters()
                if name.startswith(layer + ".")
            )
        )
        for layer in ("0", "2")
    }
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for layer, value in exact.items():
        assert value > 0 and math.isfinite(value)
        assert row["grad_norm"][layer] == pytest.approx(value, rel=1e-6)
        assert row["grad_nonfinite"][layer] == 0
    # Deltas are float32 sums of squares (fast): an extreme one may overflow, but a
    # finite run is never given a non-finite origin for it.
    assert row["nonfinite_origin"] is None
    assert not mon.diagnose().has("nonfinite")


def test_a_real_inf_is_non_finite_and_an_all_zero_gradient_is_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with gradmedic.watch(model) as mon:
        model(torch.randn(2, 4)).sum().backward()
        model[0].weight.grad.zero_()
        model[0].bias.grad.zero_()
        model[1].weight.grad[0, 0] = float("inf")
        mon.step()
    row = mon.history.rows()[0]
    assert row["grad_norm"]["0"] == 0.0
    assert row["grad_norm"]["1"] == math.inf and row["grad_nonfinite"]["1"] == 1


def test_an_underflowed_norm_read_too_late_to_redo_is_at_least_its_max_never_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(8, 64)
    with gradmedic.watch(model) as mon:
        (model(x).sum() * 1e-26).backward()  # entries ~1e-26: float32 squares underflow
        first = {n: p.grad.clone() for n, p in model.named_parameters()}
        mon.step()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()  # new gradients: the first record can no longer be redone
        mon.step()
    row = mon.history.rows()[0]
    for layer in ("0", "2"):
        grads = [g.double() for n, g in first.items() if n.startswith(layer + ".")]
        exact = math.sqrt(sum(float(g.square().sum()) for g in grads))
        biggest = max(float(g.abs().max()) for g in grads)
        assert float(torch.linalg.vector_norm(grads[0].float())) < biggest  # float32 fails
        assert biggest * (1 - 1e-6) <= row["grad_norm"][layer] <= exact * (1 + 1e-6)
    assert row["grad_max"]["0"] == pytest.approx(
        max(float(g.abs().max()) for n, g in first.items() if n.startswith("0.")), rel=1e-6
    )


def test_an_overflowed_norm_read_too_late_to_redo_is_finite_for_finite_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(8, 64)
    with gradmedic.watch(model) as mon:
        (model(x).sum() * 1e28).backward()  # entries ~1e28: float32 squares overflow
        first = {n: p.grad.clone() for n, p in model.named_parameters()}
        mon.step()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        mon.step()
    row = mon.history.rows()[0]
    assert all(torch.isfinite(g).all() for g in first.values())
    total = 0.0
    for layer in ("0", "2"):
        grads = [g.double() for n, g in first.items() if n.startswith(layer + ".")]
        exact = math.sqrt(sum(float(g.square().sum()) for g in grads))
        biggest = max(float(g.abs().max()) for g in grads)
        assert biggest * (1 - 1e-6) <= row["grad_norm"][layer] <= exact * (1 + 1e-6)
        assert row["grad_nonfinite"][layer] == 0
        total += row["grad_norm"][layer] ** 2
    assert row["global_grad_norm"] == pytest.approx(math.sqrt(total), rel=1e-9)
    assert row["nonfinite_origin"] is None and not mon.diagnose().has("nonfinite")
