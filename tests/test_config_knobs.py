"""Diagnosis knobs that act on what was recorded: changing them changes the verdict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.diagnose import DiagnosisConfig, diagnose_rows
from gradmedic.diagnose.units import fraction_at
from gradmedic.probes.activations import SLOPE_GRID


def _tanh_run(std: float) -> tuple[list[dict], torch.Tensor]:
    """One recorded step of Linear -> Tanh whose pre-activations have spread ``std``."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 256)
    with torch.no_grad():
        lin.weight.normal_(0.0, std / 32**0.5)
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(256, 1))
    x = torch.randn(512, 32)
    with gradmedic.watch(model, activations=1) as mon:
        model(x).pow(2).mean().backward()
        mon.step()
    with torch.no_grad():
        pre = lin(x)
    return list(mon.history.rows()), pre


def test_saturated_by_slope_equals_the_fraction_computed_from_the_pre_activations() -> None:
    rows, pre = _tanh_run(2.5)
    entry = rows[0]["activations"]["1"]
    slope = 1 - torch.tanh(pre).square()  # tanh' = 1 - tanh^2, max 1
    expected = [float((slope < s).double().mean()) for s in SLOPE_GRID]
    assert entry["saturated_by_slope"] == pytest.approx(expected, abs=1e-9)
    assert entry["saturated_fraction"] == pytest.approx(expected[SLOPE_GRID.index(0.05)], abs=1e-9)
    # between two rules: linear in log slope
    mid = fraction_at(entry, (0.05 * 0.1) ** 0.5)
    assert mid == pytest.approx((expected[2] + expected[3]) / 2, abs=1e-9)


def test_saturation_slope_changes_the_verdict() -> None:
    rows, pre = _tanh_run(2.5)
    slope = 1 - torch.tanh(pre).square()
    assert float((slope < 0.05).double().mean()) < 0.5 < float((slope < 0.2).double().mean())
    strict = diagnose_rows(rows)  # the 5% rule: under half saturated
    loose = diagnose_rows(rows, DiagnosisConfig(saturation_slope=0.2))
    assert "saturation" not in {f.problem.value for f in strict.findings}
    found = [f for f in loose.findings if f.problem.value == "saturation"]
    assert found and found[0].evidence["slope_rule"] == 0.2
