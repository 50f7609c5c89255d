"""The forward tracer shared by check() and watch(): completion order, first NaN/Inf maker."""

from __future__ import annotations

import pickle

import torch
from torch import nn

from cases import NanMaker
from gradmedic.forward_trace import ForwardTrace


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


def test_order_is_completion_order_and_no_grad_passes_do_not_count() -> None:
    model = nn.Sequential(Block(), nn.Linear(4, 2))
    trace = ForwardTrace(model)
    trace.arm()
    with torch.no_grad():
        model(torch.randn(3, 4))
    assert trace.order == [] and trace.take_flags().first() is None
    model(torch.randn(3, 4))
    # children finish before the block that calls them
    assert trace.order == ["0.lin", "0.act", "0", "1"]
    trace.disarm()
    assert all(not m._forward_hooks for m in model.modules())


def test_the_first_module_whose_output_holds_nan_is_named_once_per_step() -> None:
    model = nn.Sequential(nn.Linear(4, 4), NanMaker(), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    out = model[1](model[0](x))
    assert torch.isnan(out).all()  # the maker, independently
    trace = ForwardTrace(model)
    trace.arm()
    for _ in range(5):  # several forwards in one step: one flag per module, not per call
        model(x)
    flags = trace.take_flags()
    assert flags.names == ["0", "1", "2", "3"]
    assert flags.first() == "1"
    assert trace.take_flags().first() is None  # the next step starts with none
    model(torch.randn(3, 4).abs() * 0)  # log(-1): still the maker
    assert trace.take_flags().first() == "1"
    trace.disarm()


def test_a_finite_forward_names_none_and_an_armed_model_pickles_without_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    trace = ForwardTrace(model)
    trace.arm()
    model(torch.randn(2, 4))
    assert trace.take_flags().first() is None
    copy = pickle.loads(pickle.dumps(model))
    assert all(not m._forward_hooks for m in copy.modules())
    trace.disarm()
