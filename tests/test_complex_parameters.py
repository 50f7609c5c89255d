"""A complex parameter is monitored through its modulus, not a reason to stop monitoring."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradmedic


class Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8, dtype=torch.cfloat) / 4)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.mix(x).to(torch.cfloat) @ self.w).abs())


def test_a_complex_parameter_is_recorded_with_its_modulus() -> None:
    torch.manual_seed(0)
    model = Spectral()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the monitor does not switch off
        with gradmedic.watch(model, opt) as mon:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 8)).pow(2).mean().backward()
                g = model.w.grad.clone()
                opt.step()
    rows = mon.history.rows()
    assert len(rows) == 3 and mon.diagnose().status == "healthy"
    last = rows[-1]
    norm = float(torch.linalg.vector_norm(g))
    assert last["param_grad_norm"]["w"] == pytest.approx(norm, rel=1e-5)
    assert last["grad_max"]["<root>"] == float(g.abs().max())  # the largest modulus, exact
    assert all(v == 0 for v in last["grad_nonfinite"].values())
