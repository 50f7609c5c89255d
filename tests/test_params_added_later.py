"""Parameters added to the optimizer after watch() are named as not watched, once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic


def test_a_param_group_added_mid_run_is_reported_as_unwatched() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "head": nn.Linear(8, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"2 parameter\(s\) added after watch\(\)") as seen:
        with gradmedic.watch(model, opt) as mon:
            for step in range(5):
                if step == 2:
                    model["extra"] = nn.Linear(8, 8)
                    opt.add_param_group({"params": model["extra"].parameters()})
                opt.zero_grad()
                h = torch.tanh(model["a"](torch.randn(4, 8)))
                if "extra" in model:
                    h = model["extra"](h)
                model["head"](h).pow(2).mean().backward()
                opt.step()
    assert sum("added after watch()" in str(w.message) for w in seen) == 1  # said once
    assert mon.coverage()["unwatched_params"] == ["extra.weight", "extra.bias"]
    diagnosis = mon.diagnose()
    assert any("extra.weight, extra.bias" in w and "not watched" in w for w in diagnosis.warnings)


def test_no_warning_when_the_optimizer_keeps_its_parameters() -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert mon.coverage()["unwatched_params"] == [] and not mon.diagnose().warnings
