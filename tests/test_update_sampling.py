"""Update ratios: every step early in the run, on schedule after that, and on a norm jump."""

from __future__ import annotations

import torch
from torch import nn

import gradmedic
from gradmedic.monitor import EARLY_UPDATES


def test_early_steps_scheduled_steps_and_a_jump_are_measured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    jump = 47
    with gradmedic.watch(model, opt, update_every=10) as mon:
        for step in range(60):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (1000.0 if step == jump else 1.0)
            loss.backward()
            opt.step()
    measured = [r["step"] for r in mon.history.rows() if "update_ratio" in r]
    expected = sorted({*range(EARLY_UPDATES), *range(0, 60, 10), jump})
    assert measured == expected
    # The jump's update is measured for real: 1000x the gradient, 1000x the step.
    rows = {r["step"]: r for r in mon.history.rows()}
    before, at = rows[40]["update_norm"]["0"], rows[jump]["update_norm"]["0"]
    assert 300 < at / before < 3000
