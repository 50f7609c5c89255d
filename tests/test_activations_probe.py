from __future__ import annotations

import pytest
import torch
from torch import nn

from gradmedic.layers import LayerIndex
from gradmedic.probes.activations import ActivationProbe, max_slope
from gradmedic.record import materialize


def run(model: nn.Module, x: torch.Tensor, *, recording: bool = True, grad: bool = True) -> dict:
    probe = ActivationProbe()
    probe.attach(LayerIndex(model))
    probe.set_recording(recording)
    with torch.set_grad_enabled(grad):
        model(x)
    out = materialize(probe.collect(0))
    probe.detach()
    return out.get("activations", {})


def test_dead_fraction_counts_units_silent_for_every_input():
    lin = nn.Linear(8, 10)
    with torch.no_grad():
        lin.bias[:4] = -100.0  # 4 of 10 units negative for every input
    model = nn.Sequential(lin, nn.ReLU())
    x = torch.randn(32, 8)
    stats = run(model, x)["1"]
    z = lin(x).detach()
    expected = float(((z > 0).sum(0) == 0).float().mean())
    assert expected == pytest.approx(0.4)
    assert stats["kind"] == "ReLU" and stats["units"] == 10
    assert stats["dead_fraction"] == pytest.approx(expected)
    assert stats["input_mean"] == pytest.approx(float(z.mean()), rel=1e-5)
    assert stats["input_std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-4)


def test_saturation_and_mean_slope_match_autograd():
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh())
    with torch.no_grad():
        model[0].weight.mul_(6.0)
    x = torch.randn(50, 16)
    stats = run(model, x)["1"]
    z = model[0](x).detach().requires_grad_(True)
    (d,) = torch.autograd.grad(torch.tanh(z).sum(), z)
    assert stats["saturated_fraction"] == pytest.approx(float((d.abs() < 0.05).float().mean()))
    assert 0.2 < stats["saturated_fraction"] < 0.9
    assert stats["mean_slope"] == pytest.approx(float(d.abs().mean()), rel=1e-5)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.ELU(), nn.Softplus(), nn.Mish()])
def test_autograd_kinds_match_autograd(act):
    model = nn.Sequential(nn.Linear(8, 32), act)
    x = 3 * torch.randn(40, 8)
    stats = run(model, x)["1"]
    z = model[0](x).detach().requires_grad_(True)
    (d,) = torch.autograd.grad(act(z).sum(), z)
    grid = torch.linspace(-30, 30, 6001).requires_grad_(True)
    (g,) = torch.autograd.grad(act(grid).sum(), grid)
    top = float(g.abs().max())
    assert max_slope(act) == pytest.approx(top, rel=1e-3)
    assert stats["saturated_fraction"] == pytest.approx(
        float((d.abs() < 0.05 * top).float().mean()), abs=1e-6
    )
    assert stats["mean_slope"] == pytest.approx(float(d.abs().mean() / top), rel=1e-4)


def test_sigmoid_max_slope_is_a_quarter():
    assert max_slope(nn.Sigmoid()) == 0.25
    assert max_slope(nn.LeakyReLU(0.1)) == pytest.approx(1.0)


def test_conv_units_are_channels():
    for cls, shape in [(nn.Conv2d, (4, 3, 8, 8)), (nn.Conv1d, (4, 3, 20))]:
        c = cls(3, 6, 3, padding=1)
        with torch.no_grad():
            c.bias[2] = -1e3
        stats = run(nn.Sequential(c, nn.ReLU()), torch.randn(*shape))["1"]
        assert stats["units"] == 6
        assert stats["dead_fraction"] == pytest.approx(1 / 6)


def test_sequence_outputs_use_the_feature_dimension():
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.bias[:3] = -1e3
    stats = run(nn.Sequential(lin, nn.ReLU()), torch.randn(2, 7, 8))["1"]
    assert stats["units"] == 12
    assert stats["dead_fraction"] == pytest.approx(3 / 12)


@pytest.mark.parametrize("make", [lambda i: nn.ReLU(inplace=i), lambda i: nn.ELU(inplace=i)])
def test_inplace_modules_measure_the_input(make):
    torch.manual_seed(0)
    lin = nn.Linear(8, 16)
    x = torch.randn(20, 8)
    plain = run(nn.Sequential(lin, make(False)), x)["1"]
    inplace = run(nn.Sequential(lin, make(True)), x)["1"]
    assert inplace == pytest.approx(plain)


def test_records_only_when_recording_and_grad_enabled():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert run(model, torch.randn(3, 4), recording=False) == {}
    assert run(model, torch.randn(3, 4), grad=False) == {}


def test_window_is_the_union_of_forwards():
    lin = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        lin.weight[:] = torch.tensor([[1.0], [-1.0]])
    model = nn.Sequential(lin, nn.ReLU())
    probe = ActivationProbe()
    probe.attach(LayerIndex(model))
    model(torch.ones(5, 1))  # unit 1 silent
    assert materialize(probe.collect(0))["activations"]["1"]["dead_fraction"] == 0.5
    model(-torch.ones(5, 1))  # now unit 1 fires: nobody is dead over both forwards
    assert materialize(probe.collect(0))["activations"]["1"]["dead_fraction"] == 0.0
    probe.reset()
    assert probe.collect(0) == {}


def test_input_moments_pool_every_forward_of_the_step():
    # gradient accumulation: two micro-batches of different sizes and scales, one record
    torch.manual_seed(0)
    lin = nn.Linear(3, 5)
    model = nn.Sequential(lin, nn.Tanh())
    probe = ActivationProbe()
    probe.attach(LayerIndex(model))
    x1, x2 = torch.randn(7, 3), 4.0 + 3.0 * torch.randn(2, 3)
    model(x1)
    model(x2)
    stats = materialize(probe.collect(0))["activations"]["1"]
    z = torch.cat([lin(x1), lin(x2)]).detach().double()
    assert stats["input_mean"] == pytest.approx(float(z.mean()), rel=1e-5)
    assert stats["input_std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-5)
    slope = 1 - torch.tanh(z).square()
    assert stats["mean_slope"] == pytest.approx(float(slope.mean()), rel=1e-5)


def test_shared_module_gets_one_entry_per_call():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 8), nn.Linear(8, 3), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.b(self.act(self.a(x))))

    stats = run(Net(), torch.randn(6, 4))
    assert sorted(stats) == ["act", "act#1"]
    assert stats["act"]["units"] == 8 and stats["act#1"]["units"] == 3


def test_outputs_and_gradients_are_bit_identical():
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(8, 16), nn.RReLU(), nn.Dropout(0.3), nn.Linear(16, 16),
            nn.ELU(inplace=True), nn.Linear(16, 16), nn.GELU(), nn.Sigmoid(), nn.Linear(16, 2),
        )  # fmt: skip

    x = torch.randn(10, 8)
    results = []
    for with_probe in (False, True):
        model = build()
        probe = ActivationProbe()
        if with_probe:
            probe.attach(LayerIndex(model))
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        if with_probe:
            assert probe.collect(0)["activations"]
            probe.detach()
            assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_nonfinite_inputs_do_not_count_as_dead():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    x = torch.full((3, 4), float("nan"))
    stats = run(model, x)["1"]
    assert stats["dead_fraction"] == 0.0


def test_relu_shortcut_agrees_with_the_general_rule_per_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 6, 3, padding=1)
    with torch.no_grad():
        conv.bias[:2] = -100.0  # channels 0 and 1 negative everywhere: dead
    x = torch.randn(4, 2, 5, 5)
    relu = run(nn.Sequential(conv, nn.ReLU()), x)["1"]
    general = run(nn.Sequential(conv, nn.LeakyReLU(0.0)), x)["1"]  # the same slope, by autograd
    z = conv(x).detach()
    assert relu["units"] == 6
    assert relu["dead_fraction"] == pytest.approx(
        float(((z > 0).sum((0, 2, 3)) == 0).float().mean())
    )
    assert relu["dead_fraction"] == pytest.approx(2 / 6)
    assert relu["saturated_fraction"] == pytest.approx(float((z <= 0).float().mean()))
    for key in ("dead_fraction", "saturated_fraction", "mean_slope", "input_mean", "input_std"):
        assert relu[key] == pytest.approx(general[key], rel=1e-5), key


def test_more_modules_than_the_share_are_measured_in_interleaved_turns():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(4, 4), nn.ReLU())])
    probe = ActivationProbe(per_step=2)  # 5 ReLUs: shares of every 3rd, in turn
    probe.attach(LayerIndex(model))
    x = torch.randn(16, 4)
    seen = []
    for step in range(4):
        probe.set_recording(True)
        model(x)
        hooked = sum(len(m._forward_hooks) for m in model if isinstance(m, nn.ReLU))
        seen.append(sorted(materialize(probe.collect(step)).get("activations", {})))
        probe.reset()
        assert hooked == len(seen[-1])  # only the share carries hooks
    assert seen == [["1", "7"], ["3", "9"], ["5"], ["1", "7"]]
    probe.detach()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_counts_stay_exact_beyond_what_the_dtype_can_count(dtype) -> None:
    # 70,000 evaluations per activation: more than float16 holds (65504) and far more than
    # bfloat16 counts exactly (256)
    torch.manual_seed(0)
    z = torch.randn(700, 100).to(dtype)
    relu = run(nn.Sequential(nn.Identity(), nn.ReLU()), z)["1"]
    tanh = run(nn.Sequential(nn.Identity(), nn.Tanh()), z * 4)["1"]
    zeros = int((z <= 0).sum())
    assert relu["saturated_fraction"] == zeros / z.numel()
    assert relu["mean_slope"] == (z.numel() - zeros) / z.numel()
    slope = 1 - torch.tanh(z * 4).float().square()  # the probe's closed form, in float32
    want = float((slope.to(dtype).float() < 0.05).double().mean())
    assert tanh["saturated_fraction"] == pytest.approx(want, abs=2 / z.numel())
