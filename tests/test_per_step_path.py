"""The monitor's cheap per-step path still sees what it must.

The record reuses the gradient list read at the end of the backward pass, the
backward hook goes on the model's output (and one layer output inside it), and
rotating probes re-hook modules without leaving anything behind.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.layers import LayerIndex
from gradmedic.probes.deltas import DeltaProbe


class TwoHeads(nn.Module):
    """Returns ``(features, logits)``; the loss reads only the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    fail = False  # raise after the body ran (an out-of-memory error in the head, say)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        if self.fail:
            raise RuntimeError("out of memory")
        return features * 2.0, self.head(features)


def _global_norm(model: nn.Module, x: torch.Tensor) -> float:
    loss = model(x)[1].square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(torch.stack([g.square().sum() for g in grads]).sum().sqrt())


def test_a_loss_that_skips_the_first_output_still_ends_the_backward_pass_for_the_monitor() -> None:
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(5, 6)
    want = _global_norm(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmedic.watch(model, opt) as mon:
        model(x)[1].square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), want / 10)
        opt.step()
    row = mon.history.rows()[-1]
    # the pre-clip norms exist only if the end of the backward pass was seen
    assert row["clip"]["pre_norm"] == pytest.approx(want, rel=1e-5)
    assert set(row["pre_clip_grad_norm"]) == {"body.0", "body.2", "head"}
    assert row["global_grad_norm"] == pytest.approx(want / 10, rel=1e-4)


@pytest.mark.parametrize("cleared", ["4.weight", "2.weight"])  # the last one, one in the middle
def test_a_gradient_cleared_after_backward_is_not_taken_from_the_snapshot(cleared: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(2):  # the second record: the layer order is fixed by then
            opt.zero_grad()
            model(x).square().mean().backward()
            model.get_parameter(cleared).grad = None  # frozen for this step
            kept = {
                n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None
            }
            opt.step()
            row = mon.history.rows()[-1]
            assert set(row["param_grad_norm"]) == set(kept)
            for name, want in kept.items():
                assert row["param_grad_norm"][name] == pytest.approx(want, rel=1e-6)
            total = sum(v * v for v in kept.values()) ** 0.5
            assert row["global_grad_norm"] == pytest.approx(total, rel=1e-6)


class Reordered(nn.Module):
    """Registers its layers in the opposite order to the one its forward runs them in."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(8, 1)
        self.middle = nn.Linear(8, 8)
        self.first = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def test_the_first_record_maps_its_snapshot_onto_the_forward_order() -> None:
    torch.manual_seed(0)
    model, x = Reordered(), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        model(x).square().mean().backward()
        want = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # after the record: no effect
    row = mon.history.rows()[0]
    assert list(row["grad_norm"]) == ["first", "middle", "last"]  # input to output
    assert "pre_clip_grad_norm" not in row  # nothing clipped before the record
    for name, value in want.items():
        assert row["param_grad_norm"][name] == pytest.approx(value, rel=1e-6)


def test_after_a_forward_that_raises_the_next_backward_end_is_still_seen() -> None:
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(5, 6)
    want = _global_norm(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmedic.watch(model, opt) as mon:
        model.fail = True
        with pytest.raises(RuntimeError):
            model(x)  # raises after the first layer's output was seen
        model.fail = False
        model(x)[1].square().mean().backward()  # the loss skips the first output again
        torch.nn.utils.clip_grad_norm_(model.parameters(), want / 10)
        opt.step()
    assert mon.history.rows()[-1]["clip"]["pre_norm"] == pytest.approx(want, rel=1e-5)


def test_rotating_shares_leave_no_hook_guard_or_wrapper_behind() -> None:
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(3, 3), nn.Tanh()]
    model = nn.Sequential(*layers)
    probe = DeltaProbe(per_step=4)  # 12 layers: 3 shares, in turn
    probe.attach(LayerIndex(model))
    x = torch.randn(2, 3)
    seen: set[str] = set()
    for step in range(30):
        probe.set_recording(True)
        model(x).sum().backward()
        seen |= set(probe.collect(step)["delta_norm"].names)
        probe.reset()
    assert len(seen) == 12  # every layer measured
    hooked = sum(len(m._forward_hooks) for m in model.modules())
    assert hooked == 4  # one share hooked, not an accumulation of shares
    assert len(probe._hooks._wrapped) <= 12  # one wrapper per layer, reused
    copy = pickle.loads(pickle.dumps(model))  # a hooked model still pickles without hooks
    assert sum(len(m._forward_hooks) for m in copy.modules()) == 0
    probe.detach()
    assert all("__reduce_ex__" not in vars(m) for m in model.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_a_step_clipped_before_the_first_record_keeps_its_pre_clip_norms_per_layer() -> None:
    torch.manual_seed(0)
    model, x = Reordered(), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        model(x).square().mean().backward()
        per_layer = {
            name: sum(p.grad.square().sum() for p in layer.parameters()).sqrt().item()
            for name, layer in model.named_children()
        }
        total = sum(v * v for v in per_layer.values()) ** 0.5
        torch.nn.utils.clip_grad_norm_(model.parameters(), total / 4)  # the layer order moves
        opt.step()
    row = mon.history.rows()[0]
    assert row["clip"]["pre_norm"] == pytest.approx(total, rel=1e-5)
    for name, value in per_layer.items():  # each pre-clip norm under its own layer's name
        assert row["pre_clip_grad_norm"][name] == pytest.approx(value, rel=1e-5)
        assert row["grad_norm"][name] == pytest.approx(value / 4, rel=1e-4)
