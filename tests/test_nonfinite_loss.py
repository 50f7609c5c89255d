"""A NaN/Inf made by the loss (a log of 0), not by any layer, is named as the loss's."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradmedic


def run(logit: float, steps: int = 3) -> gradmedic.Monitor:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.zero_()
        model[2].weight.fill_(logit / 16)  # x = 1: the logit is 8 * 4 * 0.5 * logit / 16
        model[2].bias.zero_()
    x, t = torch.ones(16, 4), torch.zeros(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(steps):
            opt.zero_grad()
            p = model(x)
            loss = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()  # hand-written BCE
            mon.note_loss(loss)
            loss.backward()
            opt.step()
    return mon


def test_a_log_of_zero_in_the_loss_is_the_losss_with_the_logits_fix() -> None:
    mon = run(logit=40.0)  # sigmoid(40) rounds to 1.0 in float32: log(1 - p) = -inf
    row = mon.history.rows()[0]
    assert math.isinf(row["loss"]) and all(math.isfinite(v) for v in row["output_max"].values())
    assert row["nonfinite_origin"] == {"layer": "2", "where": "loss", "step": 0}
    (finding,) = mon.diagnose().by_problem("nonfinite")
    assert finding.layers == ["3", "2"]  # the Sigmoid after the last layer, then the layer
    assert "loss computation" in finding.explanation
    assert "binary_cross_entropy_with_logits" in finding.explanation
    assert finding.remedies == []  # a smaller lr does not remove a log of 0


def test_a_healthy_logit_leaves_no_finding() -> None:
    mon = run(logit=2.0)
    assert not mon.diagnose().has("nonfinite")


def test_a_nan_made_inside_a_layer_is_still_the_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.ones(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradmedic.watch(model, opt) as mon:
        opt.zero_grad()
        h = model[0](x)
        with torch.no_grad():
            model[2].weight[0, 0] = float("nan")  # the last layer's own output is NaN
        model[2](model[1](h)).mean().backward()
        opt.step()
    origin = mon.history.rows()[0]["nonfinite_origin"]
    assert origin["where"] == "forward" and origin["layer"] == "2"
