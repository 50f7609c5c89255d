"""A step whose learning rate jumped gets a lower bound on every layer's update ratio.

The update probe copies one group of layers per sampled step; a spike in a layer it does
not hold then goes unseen. On a jumped-lr step the parameter norms before and after
bound ||dw||/||w|| from below in every layer, with no copy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic


def test_a_jumped_lr_step_bounds_every_layers_update_and_is_a_spike() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])  # 4 groups of one layer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 256)
    norms = {}
    with gradmedic.watch(model, opt) as mon:
        for step in range(30):
            for group in opt.param_groups:
                group["lr"] = 1e4 if step == 25 else 1e-3
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            before = [
                torch.cat([p.detach().flatten() for p in m.parameters()]).norm() for m in model
            ]
            opt.step()
            after = [
                torch.cat([p.detach().flatten() for p in m.parameters()]).norm() for m in model
            ]
            norms[step] = [abs(float(a - b)) / float(b) for a, b in zip(after, before, strict=True)]
    rows = {r["step"]: r for r in mon.history.rows()}
    bound = rows[25]["update_ratio_bound"]
    assert list(bound) == ["0", "1", "2", "3"]  # every layer, whichever group was copied
    assert [bound[n] for n in bound] == pytest.approx(norms[25], rel=1e-4)
    assert all("update_ratio_bound" not in rows[s] for s in (24, 26))  # only the jump
    (finding,) = mon.diagnose().by_problem("unstable_updates")
    assert finding.episode.onset == 25
    assert "by at least" in finding.explanation and "learning rate jumped" in finding.explanation
