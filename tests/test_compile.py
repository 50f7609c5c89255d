"""Real torch.compile (default and fullgraph) trains under watch(), with eager's records."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradmedic


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def train(mode: str, steps: int = 6) -> tuple[list[dict], list[str], torch.Tensor, int]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 16, generator=gen), torch.randn(32, 1, generator=gen))] * steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradmedic.watch(model, opt, every=1, update_every=2) as mon:
            run = model if mode == "eager" else torch.compile(model, fullgraph=mode == "full")
            for x, y in batches:
                opt.zero_grad()
                nn.functional.mse_loss(run(x), y).backward()
                opt.step()
    ours = [str(w.message) for w in caught if "gradmedic" in str(w.message)]
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return mon.history.rows(), ours, model[0].weight.detach().clone(), frames


@pytest.mark.parametrize("mode", ["default", "full"])
def test_compiled_training_records_what_eager_records(mode: str) -> None:
    eager, eager_warnings, eager_w, _ = train("eager")
    compiled, warned, compiled_w, graphs = train(mode)
    assert eager_warnings == []
    assert len(compiled) == len(eager) == 6
    for a, b in zip(eager, compiled, strict=True):
        for key in ("grad_norm", "grad_max", "param_grad_norm"):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert b[key][name] == pytest.approx(a[key][name], rel=1e-4)
        assert b["global_grad_norm"] == pytest.approx(a["global_grad_norm"], rel=1e-4)
        if "update_ratio" in a:
            for name in a["update_ratio"]:
                assert b["update_ratio"][name] == pytest.approx(a["update_ratio"][name], rel=1e-3)
    # Monitoring does not change training: the compiled run reaches eager's weights.
    torch.testing.assert_close(compiled_w, eager_w, rtol=1e-4, atol=1e-6)
    # Deltas need hooks inside the graph: omitted, with one warning that names them.
    assert "delta_norm" in eager[0] and "delta_norm" not in compiled[0]
    assert len(warned) == 1 and "deltas" in warned[0] and "torch.compile" in warned[0]
    # No recompile storm: the first graph, and at most one more once layer order is fixed.
    assert 1 <= graphs <= 3
    assert gradmedic.Monitor  # the public name stays


def test_watching_the_compiled_module_itself() -> None:
    torch._dynamo.reset()
    model = make()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradmedic.watch(compiled, opt) as mon, pytest.warns(RuntimeWarning, match="deltas"):
        for _ in range(3):
            opt.zero_grad()
            compiled(torch.randn(8, 16)).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
    rows = mon.history.rows()
    assert mon.layers == ["0", "2", "4"]  # the compiled module's own names
    assert len(rows) == 3 and rows[-1]["grad_norm"]
    # The wrapper's hooks run outside the graph: pre-clip norms are still taken.
    assert rows[-1]["clip"]["clipped"] and rows[-1]["clip"]["pre_norm"] > 1e-3
    assert rows[-1]["global_grad_norm"] == pytest.approx(1e-3, rel=1e-4)
    assert not mon.disabled
