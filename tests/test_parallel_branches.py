"""Parallel branches (a mixture of experts) are not a chain in depth.

Experts that no token reached at the first record are placed after the layer
registered before them, not after the head; and a fitted gain that the profile's two
ends do not carry (rarely routed experts with tiny deltas in between) is no finding.
"""

from __future__ import annotations

import torch
from torch import nn

import gradmedic
from gradmedic.diagnose import diagnose_rows
from gradmedic.layers import LayerIndex


class TopOne(nn.Module):
    def __init__(self, width: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            routed = choice == e
            if routed.any():
                out[routed] = expert(x[routed])
        return x + out


def test_experts_that_did_not_run_stay_before_the_head() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), TopOne(), nn.Linear(16, 2))
    with torch.no_grad():  # route every token to expert 2 at first
        model[1].gate.weight.zero_()
        model[1].gate.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt) as mon:
        opt.zero_grad()
        model(torch.randn(8, 8)).sum().backward()
        opt.step()
    assert mon.layers[-1] == "2"  # the head is still the output side
    assert mon.layers[:3] == ["0", "1.gate", "1.experts.0"]
    assert set(mon.layers[3:-1]) == {"1.experts.1", "1.experts.2", "1.experts.3"}


def test_forward_order_places_an_unseen_layer_after_its_registered_predecessor() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    index = LayerIndex(model)
    index.set_forward_order(["3", "0", "2"])  # "1" never ran
    assert index.names == ("3", "0", "1", "2")


def test_a_gain_the_ends_do_not_carry_is_no_finding() -> None:
    names = [f"l{i}" for i in range(12)]
    # input side 1.0, branches whose deltas fall by 3e4 in between, the head at 0.2
    values = [1.0, 0.5, 0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 0.2]
    rows = [{"step": s, "delta_norm": dict(zip(names, values, strict=True))} for s in range(8)]
    assert diagnose_rows(rows, layers=names, context={"layers": names}).status == "healthy"
    # a chain with the same fitted decay, whose ends carry it, is exploding
    chain = [10.0 ** (-k / 2) for k in range(12)]
    rows = [{"step": s, "delta_norm": dict(zip(names, chain, strict=True))} for s in range(8)]
    assert diagnose_rows(rows, layers=names, context={"layers": names}).has("exploding")
