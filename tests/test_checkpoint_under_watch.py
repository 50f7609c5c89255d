"""Activation checkpointing under watch(activations=True): training unchanged, counted once.

``torch.utils.checkpoint`` reruns the checkpointed forward during backward. The monitor's
forward hooks stay out of that rerun (no double counting), and the activation probe's
own small autograd graph (the slope of a GELU or SiLU) saves nothing a non-reentrant
checkpoint would count: before, such a model stopped with a CheckpointError.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

import gradmedic


def train(act: type[nn.Module], reentrant: bool, watched: bool):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), act(), nn.Linear(16, 16), act())
    model = nn.ModuleDict({"block": block, "head": nn.Linear(16, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradmedic.watch(model, opt, activations=True) if watched else None
    x = torch.randn(8, 16, requires_grad=reentrant)  # reentrant needs an input with grad
    try:
        for _ in range(3):
            opt.zero_grad()
            h = cp.checkpoint(block, x, use_reentrant=reentrant)
            model["head"](h).pow(2).mean().backward()
            opt.step()
    finally:
        if mon is not None:
            mon.close()
    return [p.detach().clone() for p in model.parameters()], mon


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.Tanh])
def test_checkpointed_training_is_unchanged_and_counted_once(act, reentrant) -> None:
    bare, _ = train(act, reentrant, watched=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no probe switched itself off
        watched, mon = train(act, reentrant, watched=True)
    assert all(torch.equal(a, b) for a, b in zip(watched, bare, strict=True))
    rows = mon.history.rows()
    assert len(rows) == 3
    for row in rows:
        # one forward per step: the backward's recomputation is not a second call
        assert set(row["activations"]) == {"block.1", "block.3"}
        assert set(row["delta_norm"]) == {"block.0", "block.2", "head"}
