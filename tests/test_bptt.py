"""Hand-written backpropagation through time against torch.autograd on the unrolled cell.

The reference is the recurrent probe's former implementation: re-run the cell step by
step under autograd and take every state's gradient with one ``torch.autograd.grad``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmedic.probes.recurrent import unrolled_gradients
from gradmedic.tensorlists import mean_std

T, B, IN, H, PROJ = 5, 3, 4, 6, 3

# ---- reference: autograd on the unrolled cell ---------------------------------------


def reference_unrolled_gradients(module, x, h0, c0, seeds, isolate=False):
    batch = x.shape[1]
    if isolate:
        x = torch.cat([x, x], dim=1)
        h0 = None if h0 is None else torch.cat([h0, h0], dim=1)
        c0 = None if c0 is None else torch.cat([c0, c0], dim=1)
    dirs = 2 if module.bidirectional else 1
    h_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    lstm = module.mode == "LSTM"
    states = {}
    layer_in = x
    h_n, c_n = [], []
    with torch.enable_grad():
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                stream = f"l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                h = x.new_zeros(x.shape[1], h_out) if h0 is None else h0[k]
                c = x.new_zeros(x.shape[1], module.hidden_size) if c0 is None else c0[k]
                h = h.detach().requires_grad_()
                hs, cs, gate = _run_cell(module, stream, layer_in, h, c if lstm else None, bool(d))
                states[stream] = (hs, cs, gate)
                outs.append(torch.stack(hs))
                h_n.append(hs[0] if d else hs[-1])
                if lstm:
                    c_n.append(cs[0] if d else cs[-1])
            layer_in = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
        c_last = torch.stack(c_n) if lstm else None
        total = _seeded(layer_in, torch.stack(h_n), c_last, seeds, dirs, isolate)
        tensors = [t for hs, cs, _ in states.values() for t in (*hs, *cs)]
        grads = iter(torch.autograd.grad(total, tensors, allow_unused=True))
    result = {}
    for stream, (hs, cs, gate) in states.items():
        stats = {}
        g_h = _stack_grads([next(grads) for _ in hs], hs)
        g_c = _stack_grads([next(grads) for _ in cs], cs) if cs else None
        stats["dh_norm"] = _norms(g_h[:, :batch])
        if g_c is not None:
            stats["dc_norm"] = _norms(g_c[:, :batch])
        if isolate:
            stats["dh_norm_last"] = _norms(g_h[:, batch:])
            if g_c is not None:
                stats["dc_norm_last"] = _norms(g_c[:, batch:])
        if gate is not None:
            label = "forget_gate" if lstm else "update_gate"
            mean, std = mean_std(gate[:, :batch].flatten(1), dim=1)
            stats[f"{label}_mean"], stats[f"{label}_std"] = mean, std
        result[stream] = stats
    return result


def _seeded(out, h_n, c_n, seeds, dirs, isolate):
    g_out = seeds.get("out")
    if g_out is not None and isolate:
        only_last = torch.zeros_like(g_out)
        width = g_out.shape[-1] // dirs
        only_last[-1, :, :width] = g_out[-1, :, :width]
        if dirs == 2:
            only_last[0, :, width:] = g_out[0, :, width:]
        g_out = torch.cat([g_out, only_last], dim=1)
    total = out.new_zeros(())
    if g_out is not None:
        total = total + (out * g_out).sum()
    for name, value in (("h_n", h_n), ("c_n", c_n)):
        g = seeds.get(name)
        if g is not None and value is not None:
            total = total + (value * (torch.cat([g, g], dim=1) if isolate else g)).sum()
    return total


def _norms(grads):
    return torch.linalg.vector_norm(grads.flatten(1), dim=1, dtype=torch.float64)


def _stack_grads(grads, like):
    return torch.stack(
        [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]
    )


def _run_cell(module, stream, x, h, c, reverse):
    w_ih = getattr(module, f"weight_ih_{stream}").detach()
    w_hh_t = getattr(module, f"weight_hh_{stream}").detach().T
    b_ih = _bias(module, f"bias_ih_{stream}")
    b_hh = _bias(module, f"bias_hh_{stream}")
    w_hr = getattr(module, f"weight_hr_{stream}", None)
    w_hr = None if w_hr is None else w_hr.detach()
    hidden = module.hidden_size
    mode = module.mode
    xi = F.linear(x, w_ih, b_ih)
    if b_hh is not None and mode != "GRU":
        xi = xi + b_hh
    steps = xi.unbind(0)
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    hs, cs, gates = [], [], []
    for t in order:
        if mode == "LSTM":
            pre = torch.addmm(steps[t], h, w_hh_t)
            i, f, _, o = torch.sigmoid(pre).chunk(4, dim=-1)
            c = torch.addcmul(f * c, i, torch.tanh(pre[:, 2 * hidden : 3 * hidden]))
            h = o * torch.tanh(c)
            if w_hr is not None:
                h = F.linear(h, w_hr)
            cs.append(c)
            gates.append(f.detach())
        elif mode == "GRU":
            gh = torch.mm(h, w_hh_t) if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
            r, z = torch.sigmoid(steps[t][:, : 2 * hidden] + gh[:, : 2 * hidden]).chunk(2, dim=-1)
            n = torch.tanh(torch.addcmul(steps[t][:, 2 * hidden :], r, gh[:, 2 * hidden :]))
            h = torch.lerp(n, h, z)
            gates.append(z.detach())
        else:
            pre = torch.addmm(steps[t], h, w_hh_t)
            h = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
        hs.append(h)
    if reverse:
        hs.reverse()
        cs.reverse()
        gates.reverse()
    return hs, cs, (torch.stack(gates) if gates else None)


def _bias(module, name):
    b = getattr(module, name, None)
    return None if b is None else b.detach()


# ---- cases ----------------------------------------------------------------------

CELLS = {
    "rnn_tanh": lambda **kw: nn.RNN(IN, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: nn.RNN(IN, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: nn.LSTM(IN, H, **kw),
    "lstm_proj": lambda **kw: nn.LSTM(IN, H, proj_size=PROJ, **kw),
    "gru": lambda **kw: nn.GRU(IN, H, **kw),
}
SEEDS = {"out": ("out",), "state": ("h_n", "c_n"), "all": ("out", "h_n", "c_n")}


def make_case(cell, layers, bidirectional, bias, initial, seeds, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = CELLS[cell](num_layers=layers, bidirectional=bidirectional, bias=bias).to(dtype)
    dirs = 2 if bidirectional else 1
    h_out = PROJ if cell == "lstm_proj" else H
    lstm = module.mode == "LSTM"

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    x = rand(T, B, IN)
    h0 = rand(layers * dirs, B, h_out) if initial else None
    c0 = rand(layers * dirs, B, H) if initial and lstm else None
    shapes = {"out": (T, B, dirs * h_out), "h_n": (layers * dirs, B, h_out)}
    if lstm:
        shapes["c_n"] = (layers * dirs, B, H)
    grads = {name: rand(*shapes[name]) for name in SEEDS[seeds] if name in shapes}
    return module, x, h0, c0, grads


def assert_same(got, want, rtol, steps=T):
    assert got.keys() == want.keys()
    for stream in want:
        assert got[stream].keys() == want[stream].keys(), stream
        for key, value in want[stream].items():
            assert got[stream][key].shape == (steps,), (stream, key)
            torch.testing.assert_close(
                got[stream][key].double(), value.double(), rtol=rtol, atol=0, msg=(stream, key)
            )


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolate"])
def test_equals_autograd_on_the_unrolled_cell(cell, layers, bidirectional, isolate):
    for bias, initial, seeds in itertools.product([True, False], [False, True], list(SEEDS)):
        module, x, h0, c0, grads = make_case(cell, layers, bidirectional, bias, initial, seeds)
        got = unrolled_gradients(module, x, h0, c0, grads, isolate)
        want = reference_unrolled_gradients(module, x, h0, c0, grads, isolate)
        assert_same(got, want, rtol=1e-5)  # float64: the two agree to ~1e-15
        assert got[f"l{layers - 1}"]["dh_norm"].gt(0).all(), (bias, initial, seeds)


@pytest.mark.parametrize("cell", list(CELLS))
def test_float32(cell):
    module, x, h0, c0, grads = make_case(cell, 2, True, True, True, "all", dtype=torch.float32)
    got = unrolled_gradients(module, x, h0, c0, grads, isolate=True)
    want = reference_unrolled_gradients(module, x, h0, c0, grads, isolate=True)
    assert_same(got, want, rtol=1e-4)


def test_gradients_reach_the_first_step_of_every_stream():
    # a seed on the last output only: every earlier dh_t is a pure recurrence/depth term
    module, x, _, _, grads = make_case("lstm", 2, True, True, False, "out")
    grads["out"][:-1] = 0
    got = unrolled_gradients(module, x, None, None, grads)
    want = reference_unrolled_gradients(module, x, None, None, grads)
    assert_same(got, want, rtol=1e-5)
    assert got["l0"]["dh_norm"][0] > 0 and got["l0_reverse"]["dc_norm"][-1] > 0


def test_one_step_and_no_seed_at_all():
    module = nn.GRU(IN, H, num_layers=2).double()
    x = torch.randn(1, B, IN, dtype=torch.float64)
    got = unrolled_gradients(module, x, None, None, {}, isolate=True)
    assert all(v.eq(0).all() for s in got.values() for k, v in s.items() if "norm" in k)
    g = {"h_n": torch.randn(2, B, H, dtype=torch.float64)}
    got = unrolled_gradients(module, x, None, None, g)
    assert_same(got, reference_unrolled_gradients(module, x, None, None, g), rtol=1e-5, steps=1)


def test_no_graph_and_model_untouched():
    module, x, h0, c0, grads = make_case(
        "lstm_proj", 2, True, True, True, "all", dtype=torch.float32
    )
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in module.parameters()]
    versions = [p._version for p in module.parameters()]
    seeds_before = {k: v.clone() for k, v in grads.items()}
    rng = torch.get_rng_state()
    with torch.enable_grad():
        got = unrolled_gradients(module, x, h0, c0, grads, isolate=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(v.requires_grad for s in got.values() for v in s.values())
    assert [p._version for p in module.parameters()] == versions
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in module.parameters())
    assert all(torch.equal(grads[k], v) for k, v in seeds_before.items())  # seeds not mutated
