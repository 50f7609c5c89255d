"""A monitored model can be saved, pickled and copied; what comes back carries no hooks."""

from __future__ import annotations

import copy
import io
import pickle

import torch
from torch import nn

import gradmedic


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 1)
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()


def test_torch_save_and_load_of_a_monitored_model() -> None:
    model = Net()
    user_hooks = hook_count(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt, activations=True, spectra=True) as mon:
        train_step(model, opt)
        assert hook_count(model) > user_hooks  # the monitor is attached
        buf = io.BytesIO()
        torch.save(model, buf)  # what pytorch/examples does every epoch
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        x = torch.randn(3, 4)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        train_step(model, opt)  # monitoring goes on after the save
    assert hook_count(loaded) == user_hooks
    assert all("__reduce_ex__" not in vars(m) for m in loaded.modules())
    assert len(mon.history) == 2 and not mon.disabled


def test_pickle_deepcopy_and_state_dict_round_trips() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        train_step(model, opt)
        pickled = pickle.loads(pickle.dumps(model))
        copied = copy.deepcopy(model)
        shallow = copy.copy(model)
        fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        fresh.load_state_dict(model.state_dict())
        for other in (pickled, copied, fresh):
            assert hook_count(other) == 0
            torch.testing.assert_close(other(torch.ones(2, 4)), model(torch.ones(2, 4)))
        # A shallow copy shares the (monitored) submodules; its own hook dicts are clean.
        assert not shallow._forward_hooks and not shallow._forward_pre_hooks
        # A deep copy is not monitored by the original's monitor (an EMA copy, say).
        before = len(mon.history)
        copy_opt = torch.optim.SGD(copied.parameters(), lr=0.1)
        train_step(copied, copy_opt)
        assert len(mon.history) == before
    assert hook_count(model) == 0
    assert all("__reduce_ex__" not in vars(m) for m in model.modules())


def test_user_hooks_survive_the_round_trip() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].register_forward_hook(_picklable_user_hook)
    with gradmedic.watch(model):
        loaded = pickle.loads(pickle.dumps(model))
    assert list(loaded[0]._forward_hooks.values()) == [_picklable_user_hook]
    assert list(model[0]._forward_hooks.values()) == [_picklable_user_hook]


def test_two_monitors_on_one_model_then_save() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    first = gradmedic.watch(model)
    second = gradmedic.watch(model, activations=True)
    assert hook_count(pickle.loads(pickle.dumps(model))) == 0
    first.close()
    assert hook_count(pickle.loads(pickle.dumps(model))) == 0
    second.close()
    assert hook_count(model) == 0


def _picklable_user_hook(module: nn.Module, inputs: object, output: object) -> None:
    return None
