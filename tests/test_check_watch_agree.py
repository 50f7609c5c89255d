"""check() and a watch() that records the same single step name the same problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from cases import PREFLIGHT


def loss_of(out: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        return out.float().pow(2).mean()
    return nn.functional.cross_entropy(out, targets)


@pytest.mark.parametrize("case", PREFLIGHT, ids=lambda c: c.name)
def test_check_and_watch_agree_at_step_zero(case) -> None:
    model, inputs, targets = case.build()
    checked = gradmedic.check(model, inputs, targets)
    model, inputs, targets = case.build()
    with gradmedic.watch(model) as mon:
        loss_of(model(inputs), targets).backward()
        mon.step()
    watched = mon.diagnose()
    assert {f.problem for f in watched.findings} == {f.problem for f in checked.findings}
    assert {f.problem for f in checked.findings} == case.expected
