"""One operation that scales the gradient by 1e-6 is named as one place, not a chain.

A constant x1e-6 between two layers cuts the input side off; the per-layer gain fitted
through it would blame every layer, and He init (a per-layer fix) changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

import gradmedic


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e-6


def test_a_single_scale_is_named_where_it_is_and_no_reinit_is_proposed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128),
        Scale(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    x, y = torch.rand(128, 64), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    (finding,) = mon.diagnose().by_problem("vanishing")
    assert finding.evidence["jump_between"] == ["4", "6"]
    assert 1e-7 < finding.evidence["jump_factor"] < 1e-5
    assert "in one place, going back from layer '6' to layer '4'" in finding.explanation
    assert "init_scheme" not in {
        gradmedic.remedies.registry.kind_of(r).name for r in finding.remedies
    }


def test_a_sigmoid_chain_is_still_a_chain() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(64, 32)).pow(2).mean().backward()
            opt.step()
    (finding,) = mon.diagnose().by_problem("vanishing")
    assert "jump_between" not in finding.evidence
    assert finding.remedies[0].name == "swap_relu"
