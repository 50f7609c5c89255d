"""Property-based: over random shapes, activations, dtypes and inits, the monitor is exact
(per-layer norms equal autograd's) and invisible (outputs bit-identical, eager and compiled)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradmedic

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU]
INITS = {
    "default": lambda w: None,
    "xavier": nn.init.xavier_normal_,
    "he": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "normal": lambda w: nn.init.normal_(w, std=1.0),
    "orthogonal": nn.init.orthogonal_,
}


@st.composite
def setups(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    return {
        "kind": kind,
        "depth": draw(st.integers(1, 5)),
        "width": draw(st.integers(1, 12)),
        "act": draw(st.sampled_from(ACTIVATIONS)),
        "init": draw(st.sampled_from(sorted(INITS))),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "batch": draw(st.integers(1, 6)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(setup: dict) -> tuple[nn.Module, torch.Tensor, list[str]]:
    torch.manual_seed(setup["seed"])
    w, act = setup["width"], setup["act"]
    layers: list[nn.Module] = []
    if setup["kind"] == "mlp":
        for _ in range(setup["depth"]):
            layers += [nn.Linear(w, w), act()]
        layers.append(nn.Linear(w, 1))
        x = torch.randn(setup["batch"], w)
    else:
        channels = 1
        for _ in range(setup["depth"]):
            layers += [nn.Conv2d(channels, w, 3, padding=1), act()]
            channels = w
        layers += [nn.Flatten(), nn.Linear(w * 16, 1)]
        x = torch.randn(setup["batch"], 1, 4, 4)
    model = nn.Sequential(*layers).to(setup["dtype"])
    for m in model:
        if isinstance(m, nn.Linear | nn.Conv2d):
            INITS[setup["init"]](m.weight.data)
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear | nn.Conv2d)]
    return model, x.to(setup["dtype"]), names


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_per_layer_norms_equal_autograd(setup: dict) -> None:
    model, x, names = build(setup)
    grads = torch.autograd.grad(loss_of(model(x)), list(model.parameters()))
    expected: dict[str, float] = {}
    for (pname, _), g in zip(model.named_parameters(), grads, strict=True):
        layer = pname.split(".")[0]
        expected[layer] = expected.get(layer, 0.0) + float(g.double().square().sum())
    with gradmedic.watch(model) as mon:
        loss_of(model(x)).backward()
        mon.step()
    row = mon.history.rows()[0]
    assert list(row["grad_norm"]) == names
    for layer, sq in expected.items():
        assert row["grad_norm"][layer] == pytest.approx(sq**0.5, rel=1e-5, abs=1e-30)


def outputs_and_grads(
    model: nn.Module, x: torch.Tensor, steps: int, watch: bool, compiled: bool
) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = (
        gradmedic.watch(model, opt, activations=True, spectra=True, update_every=1)
        if watch
        else None
    )
    # Dynamo traces the hooks whatever the backend; "eager" keeps the test fast
    # (tests/test_compile.py runs the default inductor backend).
    run = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
    seen = []
    for _ in range(steps):
        opt.zero_grad()
        out = run(x)
        loss_of(out).backward()
        opt.step()
        seen += [out.detach().clone(), *(p.grad.clone() for p in model.parameters())]
    if mon is not None:
        mon.close()
        assert len(mon.history) == steps and not mon.disabled
    return seen


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups())
def test_monitoring_is_bit_identical(setup: dict, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()
    model, x, _ = build(setup)
    bare = outputs_and_grads(model, x, 2, watch=False, compiled=compiled)
    model, x, _ = build(setup)
    watched = outputs_and_grads(model, x, 2, watch=True, compiled=compiled)
    assert len(bare) == len(watched)
    for a, b in zip(bare, watched, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
