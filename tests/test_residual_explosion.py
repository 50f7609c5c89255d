"""A residual stack without normalization that explodes: its first fix is a zero-init of
each block's last layer (He init leaves it exploding), and the NaN origin on a deep model
is named among the layers measured, never inside a block's container."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradmedic
from gradmedic.diagnose import diagnose_rows
from gradmedic.diagnose.nonfinite import suspects
from gradmedic.remedies import init


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            fc.weight.data *= 1.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(torch.relu(x))))


def stack(blocks: int = 30) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), *[Block() for _ in range(blocks)], nn.Linear(32, 4))


def end_ratio(model: nn.Module) -> float:
    """||dL/d out|| of the first layer over the last block's, by autograd."""
    outs = {}
    for name in ("0", str(len(model) - 2)):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outs.__setitem__(name, o) or o.retain_grad()
        )
    x, y = torch.rand(16, 32, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 4
    nn.functional.cross_entropy(model(x), y).backward()
    first, last = (outs[n].grad.norm().item() for n in outs)
    return first / last


def test_the_first_fix_of_a_residual_explosion_removes_it() -> None:
    model = stack()
    assert end_ratio(stack()) > 1e3  # the truth: it explodes toward the input
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.rand(16, 32)), torch.arange(16) % 4).backward()
            opt.step()
    (finding,) = mon.diagnose().by_problem("exploding")
    first = finding.remedies[0]
    assert first.name == "residual_zero_init"
    fixed = stack()
    exec(first.call, {"gradmedic": gradmedic, "model": fixed})
    assert 0.1 < end_ratio(fixed) < 10  # identity blocks: nothing multiplies the gradient
    he = stack()
    init.apply(he, "he")
    assert end_ratio(he) > 1e3  # the per-layer init alone does not


def test_residual_zero_zeroes_only_each_blocks_last_layer() -> None:
    model = stack(3)
    report = init.apply(model, "residual_zero")
    assert report.layers == ["1.fc2", "2.fc2", "3.fc2"]
    assert all(model[k].fc2.weight.detach().abs().sum().item() == 0 for k in (1, 2, 3))
    assert all(model[k].fc1.weight.detach().abs().sum().item() > 0 for k in (1, 2, 3))
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    kind = gradmedic.remedies.registry.get("init_scheme")
    assert "residual_zero_init" not in {r.name for r in kind.defaults(plain)}
    assert "residual_zero_init" in {r.name for r in kind.defaults(model)}


def test_a_container_is_no_suspect_and_an_unmeasured_prefix_is_said() -> None:
    layers = ["0", "1.fc1", "1.fc2", "2.fc1", "2.fc2", "3"]
    order = ["0", "1.fc1", "1.fc2", "1", "2.fc1", "2.fc2", "2", "3", ""]
    assert suspects("2.fc1", {"layers": layers, "forward_order": order}) == []
    rows = [
        {
            "step": 5,
            "output_max": {"0": 1.0, "2.fc1": math.inf, "3": math.nan},  # 1.fc* unmeasured
            "nonfinite_origin": {"layer": "2.fc1", "where": "forward", "step": 5},
            "grad_norm": dict.fromkeys(layers, math.nan),
        }
    ]
    context = {"layers": layers, "forward_order": order}
    (finding,) = diagnose_rows(rows, layers=layers, context=context).by_problem("nonfinite")
    assert "among the layers measured at that step (2 layers before it were not" in (
        finding.explanation
    )
    assert finding.layers == ["2.fc1"]
