"""The Monitor against independent autograd computations, and its guarantees."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.history import load_history
from gradmedic.probes.base import Probe
from gradmedic.report.run_report import findings_html
from gradmedic.report.summary import summary_text


def mlp(depth: int = 30, width: int = 16, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def sequential_reference(model: nn.Sequential, x: torch.Tensor, loss_fn):
    """Layer outputs and parameter grads computed by hand with autograd.grad."""
    outputs: dict[str, torch.Tensor] = {}
    h = x
    for name, module in model.named_children():
        h = module(h)
        if any(True for _ in module.parameters(recurse=False)):
            outputs[name] = h
    loss = loss_fn(h)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [*outputs.values(), *params.values()])
    deltas = {n: g.norm().item() for n, g in zip(outputs, grads[: len(outputs)], strict=True)}
    pgrads = dict(zip(params, grads[len(outputs) :], strict=True))
    layer_norms: dict[str, float] = {}
    for pname, g in pgrads.items():
        layer = pname.rsplit(".", 1)[0]
        layer_norms[layer] = layer_norms.get(layer, 0.0) + g.double().pow(2).sum().item()
    return deltas, {k: math.sqrt(v) for k, v in layer_norms.items()}, pgrads


def monitored_row(model: nn.Module, x: torch.Tensor, loss_fn) -> dict:
    with gradmedic.watch(model, updates=False) as mon:
        loss_fn(model(x)).backward()
        mon.step()
    return mon.history.rows()[0]


def assert_close_dict(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert list(got) == list(want), (list(got), list(want))
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel), k


def test_30_layer_mlp_matches_autograd() -> None:
    model = mlp(30).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    loss_fn = lambda y: (y**2).mean()  # noqa: E731
    deltas, norms, _ = sequential_reference(model, x, loss_fn)
    model.zero_grad()
    row = monitored_row(model, x, loss_fn)
    assert_close_dict(row["grad_norm"], norms)
    assert_close_dict(row["delta_norm"], deltas)
    total = math.sqrt(sum(v * v for v in norms.values()))
    assert row["global_grad_norm"] == pytest.approx(total, rel=1e-6)
    # Deltas shrink toward the input through 29 tanh layers: the first is smaller than the last.
    assert row["delta_norm"]["0"] < row["delta_norm"]["58"]


def test_a_net_deeper_than_the_per_step_share_is_measured_in_interleaved_turns(
    monkeypatch,
) -> None:
    from gradmedic.probes import deltas as delta_module

    monkeypatch.setattr(delta_module, "PER_STEP", 4)  # 10 layers: shares of every 3rd layer
    torch.manual_seed(0)
    model = mlp(10).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    loss_fn = lambda y: (y**2).mean()  # noqa: E731
    names = [str(2 * i) for i in range(10)]
    deltas, _, _ = sequential_reference(model, x, loss_fn)  # no optimizer: the weights stay
    with gradmedic.watch(model, updates=False) as mon:
        for turn in range(4):
            model.zero_grad()
            loss_fn(model(x)).backward()
            mon.step()
            hooked = sum(1 for m in model.modules() for _ in m._forward_hooks.values())
            row = mon.history.rows()[-1]
            want = {n: deltas[n] for n in names[turn % 3 :: 3]}
            assert_close_dict(row["delta_norm"], want)
            assert list(row["output_max"]) == list(want)
            assert row["grad_norm"].keys() == set(names)  # gradients: every layer, every step
    assert hooked <= 4 + 3  # the share, plus the pass watch on the model and its end layers


def test_cnn_matches_autograd() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 1])
    loss_fn = lambda y: nn.functional.cross_entropy(y, target)  # noqa: E731
    deltas, norms, _ = sequential_reference(model, x, loss_fn)
    model.zero_grad()
    row = monitored_row(model, x, loss_fn)
    assert_close_dict(row["grad_norm"], norms)
    assert_close_dict(row["delta_norm"], deltas)


def test_transformer_encoder_layer_matches_autograd() -> None:
    layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True
    ).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w = torch.randn(3, 5, 16, dtype=torch.float64)
    # Independent forward, written out from the layer's definition (post-norm).
    a = layer.self_attn(x, x, x, need_weights=False)[0]
    h1 = layer.norm1(x + a)
    l1 = layer.linear1(h1)
    l2 = layer.linear2(torch.relu(l1))
    out = layer.norm2(h1 + l2)
    loss = (out * w).sum()
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(loss, [a, h1, l1, l2, out, *params.values()])
    want_delta = dict(
        zip(
            ["self_attn", "norm1", "linear1", "linear2", "norm2"],
            [g.norm().item() for g in grads[:5]],
            strict=True,
        )
    )
    pg = dict(zip(params, grads[5:], strict=True))
    owners = {
        "self_attn": ["self_attn.in_proj_weight", "self_attn.in_proj_bias"],
        "self_attn.out_proj": ["self_attn.out_proj.weight", "self_attn.out_proj.bias"],
        "linear1": ["linear1.weight", "linear1.bias"],
        "linear2": ["linear2.weight", "linear2.bias"],
        "norm1": ["norm1.weight", "norm1.bias"],
        "norm2": ["norm2.weight", "norm2.bias"],
    }
    want_norm = {k: math.sqrt(sum(pg[p].pow(2).sum().item() for p in v)) for k, v in owners.items()}

    row = monitored_row(layer, x, lambda y: (y * w).sum())
    for k, v in want_delta.items():
        assert row["delta_norm"][k] == pytest.approx(v, rel=1e-6), k
    for k, v in want_norm.items():
        assert row["grad_norm"][k] == pytest.approx(v, rel=1e-6), k
    # Forward order puts attention first and the final norm last.
    assert row["delta_norm"] and next(iter(row["delta_norm"])) == "self_attn"
    assert list(row["delta_norm"])[-1] == "norm2"


def _train(model: nn.Module, monitor: bool, steps: int = 3, **kw) -> tuple[list, list]:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = gradmedic.watch(model, opt, activations=False, **kw) if monitor else None
    outs, grads = [], []
    for _ in range(steps):
        x = torch.randn(16, 16)
        opt.zero_grad()
        y = model(x)
        y.pow(2).mean().backward()
        outs.append(y.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    if mon:
        mon.close()
    return outs, grads


def test_monitoring_is_bit_identical() -> None:
    torch.manual_seed(0)
    base = mlp(6, act=nn.ReLU)
    import copy

    a, b = copy.deepcopy(base), copy.deepcopy(base)
    outs_a, grads_a = _train(a, monitor=False)
    outs_b, grads_b = _train(b, monitor=True, update_every=1)
    for oa, ob in zip(outs_a, outs_b, strict=True):
        assert torch.equal(oa, ob)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_update_ratio_matches_sgd_formula() -> None:
    model = mlp(3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradmedic.watch(model, opt, update_every=1) as mon:
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        want = {}
        for name in mon.layers:
            mod = model.get_submodule(name)
            g = math.sqrt(sum(p.grad.pow(2).sum().item() for p in mod.parameters()))
            w = math.sqrt(sum(p.pow(2).sum().item() for p in mod.parameters()))
            want[name] = 0.05 * g / w  # plain SGD: dw = -lr * g
        opt.step()
    row = mon.history.rows()[0]
    assert_close_dict(row["update_ratio"], want, rel=1e-5)
    assert row["lr"] == [0.05]


def test_manual_step_measures_updates_between_steps() -> None:
    model = mlp(2, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, update_every=1) as mon:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 4)).sum().backward()
            g = {
                n: math.sqrt(
                    sum(p.grad.pow(2).sum().item() for p in model.get_submodule(n).parameters())
                )
                for n in mon.layers
            }
            mon.step()
            opt.step()
    row = mon.history.rows()[1]
    # the update measured at step 1 is the SGD step taken after step 0's record
    assert "update_norm" in row
    assert "update_norm" not in mon.history.rows()[0]
    assert row["update_norm"]["0"] > 0
    assert set(g) == set(row["grad_norm"])


def test_every_records_one_step_in_n_and_history_is_bounded() -> None:
    model = nn.Linear(2, 1)
    with gradmedic.watch(model, every=3, history=4) as mon:
        for _ in range(30):
            model(torch.randn(2, 2)).sum().backward()
            mon.step()
    steps = [r["step"] for r in mon.history.rows()]
    assert steps == [18, 21, 24, 27]
    assert mon.history.total == 10


@pytest.mark.slow
def test_history_memory_bounded_over_100k_steps() -> None:
    import tracemalloc

    model = nn.Linear(2, 1)
    x = torch.randn(2, 2)
    with gradmedic.watch(model, history=100, deltas=False, updates=False) as mon:
        tracemalloc.start()
        sizes = []
        for i in range(100_000):
            model(x).sum().backward()
            mon.step()
            if i in (5_000, 99_999):
                gc.collect()
                sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
    assert len(mon.history) == 100
    assert mon.history.total == 100_000
    assert sizes[1] < sizes[0] + 200_000  # no growth with the number of steps


def test_history_memory_bounded_short() -> None:
    import tracemalloc

    model = nn.Linear(2, 1)
    x = torch.randn(2, 2)
    with gradmedic.watch(model, history=50, deltas=True, updates=False) as mon:
        tracemalloc.start()
        sizes = []
        for i in range(3_000):
            model(x).sum().backward()
            mon.step()
            if i in (500, 2_999):
                gc.collect()  # count live memory, not garbage awaiting collection
                sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
    assert len(mon.history) == 50
    assert sizes[1] < sizes[0] + 100_000


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"every": 0}, ValueError, "every"),
        ({"every": "2"}, TypeError, "every"),
        ({"history": 1.5}, TypeError, "history"),
        ({"update_every": -1}, ValueError, "update_every"),
        ({"deltas": "yes"}, TypeError, "deltas"),
        ({"probes": [object()]}, TypeError, "probes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        gradmedic.watch(nn.Linear(2, 2), **kwargs)


def test_bad_model_and_optimizer() -> None:
    with pytest.raises(TypeError, match="model"):
        gradmedic.watch("not a model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        gradmedic.watch(nn.Linear(2, 2), optimizer=[1, 2])  # type: ignore[arg-type]


class Exploding(Probe):
    name = "exploding"

    def attach(self, index) -> None:
        pass

    def collect(self, step: int) -> dict:
        if step == 2:
            raise RuntimeError("probe bug")
        return {"custom": step}

    def detach(self) -> None:
        pass


def test_probe_failure_never_raises_and_keeps_records() -> None:
    model = mlp(3, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt, probes=[Exploding()]) as mon:
        with pytest.warns(RuntimeWarning, match="probe bug"):
            for _ in range(5):
                opt.zero_grad()
                model(torch.randn(2, 4)).sum().backward()
                opt.step()
    # The failing probe is switched off; every other statistic is still recorded.
    rows = mon.history.rows()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r.get("custom") for r in rows] == [0, 1, None, None, None]
    assert all(r["grad_norm"] for r in rows)
    assert not mon.disabled


def test_close_removes_every_hook() -> None:
    model = mlp(4, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradmedic.watch(model, opt, update_every=1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mon.close()
    mon.close()
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_frozen_unused_and_tied_parameters() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.frozen = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.frozen.requires_grad_(False)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.frozen(self.body(self.emb(idx))))

    net = Net()
    idx = torch.randint(0, 10, (3, 5))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    with gradmedic.watch(net, opt, update_every=1) as mon:
        opt.zero_grad()
        net(idx).sum().backward()
        opt.step()
    row = mon.history.rows()[0]
    assert set(row["grad_norm"]) == {"emb", "body.0"}  # tied weight belongs to emb
    assert row["grad_norm"]["emb"] == pytest.approx(net.emb.weight.grad.norm().item(), rel=1e-6)
    assert "frozen" not in row["update_ratio"] and row["update_ratio"]["emb"] > 0
    # head has no parameters of its own (tied) but frozen's output still carries a delta
    assert "frozen" in row["delta_norm"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms(dtype) -> None:
    model = mlp(3, width=8).to(dtype)
    with gradmedic.watch(model) as mon:
        model(torch.randn(4, 8, dtype=dtype)).float().pow(2).mean().backward()
        mon.step()
    row = mon.history.rows()[0]
    for name in mon.layers:
        want = math.sqrt(
            sum(p.grad.float().pow(2).sum().item() for p in model.get_submodule(name).parameters())
        )
        assert row["grad_norm"][name] == pytest.approx(want, rel=1e-3)


def test_gradient_accumulation_and_eval_between_steps() -> None:
    model = mlp(3, width=8).double()
    xs = [torch.randn(4, 8, dtype=torch.float64) for _ in range(3)]
    with gradmedic.watch(model) as mon:
        for x in xs:
            model(x).pow(2).sum().backward()
        with torch.no_grad():
            model.eval()
            model(torch.randn(100, 8, dtype=torch.float64))  # must not disturb the record
            model.train()
        mon.step()
    row = mon.history.rows()[0]
    # The delta of the accumulated batch: sqrt of the sum of the micro-batches' squares.
    want = 0.0
    for x in xs:
        h = model[0](x)
        out = model[2](model[1](h)) if False else model[4](model[3](model[2](model[1](h))))
        (g,) = torch.autograd.grad(out.pow(2).sum(), h)
        want += g.pow(2).sum().item()
    assert row["delta_norm"]["0"] == pytest.approx(math.sqrt(want), rel=1e-9)
    g_total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model[0].parameters()))
    assert row["grad_norm"]["0"] == pytest.approx(g_total, rel=1e-9)


class NaNAfter(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_nonfinite_origin_forward() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.ReLU(),
        nn.Linear(4, 4),
        NaNAfter(),
        nn.Linear(4, 4),
        nn.ReLU(),
        nn.Linear(4, 1),
    )
    with gradmedic.watch(model) as mon:
        model(torch.randn(2, 4)).sum().backward()
        mon.step()
    row = mon.history.rows()[0]
    # layer 4 is the first whose output holds NaN: NaNAfter sits just before it
    assert row["nonfinite_origin"] == {"layer": "4", "where": "forward", "step": 0}
    assert mon.first_nonfinite == row["nonfinite_origin"]
    assert row["grad_nonfinite"]["0"] == sum(p.numel() for p in model[0].parameters())


class BadBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class InfInBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BadBackward.apply(x)


def test_nonfinite_origin_backward() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        InfInBackward(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 1),
    )
    with gradmedic.watch(model) as mon:
        model(torch.randn(2, 4)).sum().backward()
        mon.step()
    origin = mon.history.rows()[0]["nonfinite_origin"]
    assert origin == {"layer": "2", "where": "backward", "step": 0}
    assert mon.history.rows()[0]["grad_norm"]["4"] < float("inf")


def test_jsonl_sink_survives_a_crash(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    script = textwrap.dedent(
        f"""
        import os, torch, gradmedic
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = gradmedic.watch(model, opt, sink={str(path)!r})
        for i in range(7):
            opt.zero_grad(); model(torch.randn(4, 3)).sum().backward(); opt.step()
        os._exit(3)  # a hard crash: no close(), no interpreter cleanup
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    header, rows = load_history(path)
    assert header["layers"] == ["0", "2"]
    assert [r["step"] for r in rows] == list(range(7))
    # A second run appends; the first run's records stay.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert len(load_history(path, run=0)[1]) == 7
    assert load_history(path, run=-1)[0]["run"] == 1
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_monitor_step_with_optimizer_warns() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.step()
    assert any("ignored" in str(w.message) for w in caught)
    assert len(mon.history) == 0


def test_sink_rank_template(tmp_path) -> None:
    model = nn.Linear(2, 1)
    with gradmedic.watch(model, sink=tmp_path / "run-{rank}.jsonl") as mon:
        model(torch.randn(3, 2)).sum().backward()
        mon.step()
    header, rows = load_history(tmp_path / "run-0.jsonl")
    assert len(rows) == 1 and header["layers"] == ["<root>"]


def test_weight_spectra_match_svd() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 280), nn.ReLU(), nn.Conv1d(1, 4, 3), nn.Flatten())
    with gradmedic.watch(model, spectra=True, update_every=2) as mon:
        for _ in range(5):
            model(torch.randn(2, 1, 300)).sum().backward()
            mon.step()
    rows = mon.history.rows()
    assert "weight_sigma_max" in rows[0] and "weight_sigma_max" not in rows[1]
    assert rows[0]["weight_sigma_max"]["0"] <= rows[4]["weight_sigma_max"]["0"] + 1e-6
    want0 = torch.linalg.svdvals(model[0].weight.detach().double())[0].item()
    want2 = torch.linalg.svdvals(model[2].weight.detach().reshape(4, -1).double())[0].item()
    # 280 > 256: power iteration, warm-started, converging from below; 30 iterations in
    assert rows[4]["weight_sigma_max"]["0"] == pytest.approx(want0, rel=2e-2)
    assert rows[4]["weight_sigma_max"]["2"] == pytest.approx(want2, rel=1e-6)


def test_an_optimizer_of_another_model_is_warned_about_once_at_watch() -> None:
    import warnings as w

    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="steps none of the model's parameters"):
        gradmedic.watch(model, torch.optim.SGD(other.parameters(), lr=0.1)).close()
    with w.catch_warnings():
        w.simplefilter("error")  # a subset, or extra tensors, is a real setup: no warning
        gradmedic.watch(model, torch.optim.SGD([model.weight], lr=0.1)).close()
        extra = torch.nn.Parameter(torch.ones(1))
        gradmedic.watch(model, torch.optim.SGD([*model.parameters(), extra], lr=0.1)).close()


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_records_without_any_backward_are_not_healthy(with_optimizer: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if with_optimizer else None
    with gradmedic.watch(model, opt) as mon:
        for _ in range(5):
            model(torch.randn(4, 8)).pow(2).mean()  # the loss, and no loss.backward()
            opt.step() if opt is not None else mon.step()
        assert len(mon.history.rows()) == 5
        d = mon.diagnose()
    assert d.status == "nothing_checked" and not d.healthy
    at = "optimizer.step()" if with_optimizer else "monitor.step()"
    assert f"call loss.backward() before {at}" in d.warnings[0]
    first = summary_text(d).splitlines()[0]
    assert first.startswith("gradmedic: nothing diagnosed: 5 record(s)") and at in first
    # one backward is enough to be diagnosed again (before the cut-off status, see below)
    with gradmedic.watch(model, opt) as mon:
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step() if opt is not None else mon.step()
        assert mon.diagnose().status == "healthy"


class _Checkpointed(nn.Module):
    """Six checkpointed blocks and a head; ``unused`` adds a head the loss never reads."""

    def __init__(self, reentrant: bool, unused: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.head = nn.Linear(8, 1)
        self.pooler = nn.Linear(8, 8) if unused else None
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        if self.pooler is not None:
            self.pooler(x)  # runs, but its output never reaches the loss (like BERT's pooler)
        return self.head(x)


def test_a_model_mostly_cut_off_from_its_loss_is_not_healthy() -> None:
    def run(reentrant: bool, unused: bool = False) -> gradmedic.Diagnosis:
        torch.manual_seed(0)
        model = _Checkpointed(reentrant, unused)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradmedic.watch(model, opt) as mon, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own "None of the inputs have requires_grad"
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
            # torch itself: the reentrant checkpoint left every block without a gradient
            no_grad = [n for n, p in model.named_parameters() if p.grad is None]
            return mon.diagnose(), no_grad

    cut, no_grad = run(reentrant=True)
    assert sorted({n.rsplit(".", 1)[0] for n in no_grad}) == [f"blocks.{i}" for i in range(6)]
    assert cut.status == "not_reached" and not cut.healthy
    assert list(cut.coverage.unreached) == [f"blocks.{i}" for i in range(6)]
    assert cut.warnings[0].startswith("6 of 7 trainable layers never received a gradient")
    assert "use_reentrant=False" in cut.warnings[0]
    assert summary_text(cut).splitlines()[1].startswith("! 6 of 7")
    assert cut.to_dict()["coverage"]["unreached"] == [f"blocks.{i}" for i in range(6)]
    fine, no_grad = run(reentrant=False)
    assert no_grad == [] and fine.healthy
    pooled, no_grad = run(reentrant=False, unused=True)  # 1 of 8 layers unused: normal
    assert no_grad == ["pooler.weight", "pooler.bias"] and pooled.healthy
    assert "not healthy" in findings_html(cut) and "use_reentrant=False" in findings_html(cut)
    assert "use_reentrant=False" in cut._repr_html_()


def test_frozen_layers_and_sampled_records_are_not_called_cut_off() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)], nn.Linear(8, 1))
    for layer in model[:5]:
        layer.requires_grad_(False)  # a linear probe on a frozen backbone
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
        assert [n for n, p in model.named_parameters() if p.grad is not None] == [
            "5.weight",
            "5.bias",
        ]
        d = mon.diagnose()
    assert d.status == "healthy" and not d.coverage.unreached


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_cleared_between_backward_and_step_are_not_healthy(set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with gradmedic.watch(model, opt) as mon:
        for _ in range(5):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.zero_grad(set_to_none=set_to_none)  # the bug: cleared before the step
            opt.step()
        d = mon.diagnose()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert d.status == "nothing_checked"
    assert "zero_grad() called between loss.backward() and optimizer.step()" in d.warnings[0]


def test_a_functional_loop_without_grad_attributes_is_diagnosed_from_its_deltas() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with gradmedic.watch(model) as mon:
        for _ in range(5):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            grads = torch.autograd.grad(loss, list(model.parameters()))  # no .grad is set
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads, strict=True):
                    p -= 0.1 * g
            mon.step(loss=loss)
        rows = mon.history.rows()
        d = mon.diagnose()
    assert all(p.grad is None for p in model.parameters())
    assert all("grad_norm" not in r and r["delta_norm"] for r in rows)
    assert d.status == "healthy" and "vanishing" in d.coverage.checked
