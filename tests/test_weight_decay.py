import pytest
import torch
from torch import nn

import gradmedic
from gradmedic import GradmedicError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.GRU(4, 4)
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 2, 1)


def _names(model, group):
    lookup = {id(p): n for n, p in model.named_parameters()}
    return sorted(lookup[id(p)] for p in group["params"])


def test_groups_split_weights_from_the_rest():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = gradmedic.add_weight_decay(opt, model, weight_decay=1e-3)
    assert out is opt
    decay, rest = opt.param_groups
    assert _names(model, decay) == [
        "conv.weight",
        "fc.weight",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l0",
    ]
    assert _names(model, rest) == [
        "conv.bias",
        "emb.weight",
        "fc.bias",
        "norm.bias",
        "norm.weight",
        "rnn.bias_hh_l0",
        "rnn.bias_ih_l0",
    ]
    assert (decay["weight_decay"], rest["weight_decay"]) == (1e-3, 0.0)
    assert decay["lr"] == rest["lr"] == 0.1 and decay["momentum"] == 0.9


def test_decay_applies_to_weights_only_by_hand():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = gradmedic.add_weight_decay(torch.optim.SGD(model.parameters(), lr=0.5), model, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # SGD with L2: w <- w - lr * (0 + wd * w) = 0.95 w; the others do not move
    assert torch.allclose(model[0].weight, 0.95 * before["0.weight"])
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(model.get_parameter(name), before[name])


def test_optimizer_state_and_foreign_groups_are_kept():
    model = nn.Linear(3, 3)
    extra = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam(
        [{"params": model.parameters(), "lr": 1e-2}, {"params": [extra], "weight_decay": 0.5}]
    )
    model(torch.randn(4, 3)).sum().backward()
    extra.grad = torch.ones(2)
    opt.step()
    moments = {id(p): opt.state[p]["exp_avg"].clone() for p in [*model.parameters(), extra]}
    gradmedic.add_weight_decay(opt, model, weight_decay=1e-2)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in opt.param_groups] == [
        (1, 1e-2, 1e-2),
        (1, 0.0, 1e-2),
        (1, 0.5, 1e-3),
    ]
    for p in [*model.parameters(), extra]:
        assert torch.equal(opt.state[p]["exp_avg"], moments[id(p)])
    opt.step()  # still a working optimizer, and its state_dict round-trips
    opt.load_state_dict(opt.state_dict())
    assert int(opt.state[extra]["step"]) == 2


def test_l2_decay_bounds_the_weight_norm():
    # R5: with a gradient that keeps pushing w outward, decay wd gives the fixed point
    # w* = g / wd instead of unbounded growth (SGD: w <- w - lr (-g + wd w)).
    layer = nn.Linear(1, 1, bias=False)
    opt = gradmedic.add_weight_decay(torch.optim.SGD(layer.parameters(), lr=0.1), layer, 0.5)
    for _ in range(300):
        layer.weight.grad = torch.full((1, 1), -2.0)
        opt.step()
    assert float(layer.weight.detach()) == pytest.approx(2.0 / 0.5, rel=1e-4)


def test_errors():
    model = nn.Linear(2, 2)
    other = nn.Linear(2, 2)
    with pytest.raises(GradmedicError, match="none of the model"):
        gradmedic.add_weight_decay(torch.optim.SGD(other.parameters(), lr=0.1), model)
    with pytest.raises(GradmedicError, match="weight_decay"):
        gradmedic.add_weight_decay(torch.optim.SGD(model.parameters(), lr=0.1), model, -1.0)
