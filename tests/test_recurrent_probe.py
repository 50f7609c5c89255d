"""RecurrentProbe against a hand-unrolled network whose h_t keep their gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradmedic.layers import LayerIndex
from gradmedic.probes.recurrent import RecurrentProbe
from gradmedic.record import materialize


def hand_unroll(module, x, h0=None, c0=None):
    """Run ``module`` by hand (time-major x), returning output, h_n, c_n and the state lists.

    Gates are sliced by index from the stacked weights, every state calls
    ``retain_grad()`` so ``.grad`` is the total derivative after ``backward()``.
    """
    H = module.hidden_size
    P = module.proj_size if getattr(module, "proj_size", 0) else H
    dirs = 2 if module.bidirectional else 1
    T, B = x.shape[:2]
    inp = x
    states, h_last, c_last = {}, [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            Wi, Wh = getattr(module, f"weight_ih_{sfx}"), getattr(module, f"weight_hh_{sfx}")
            bi, bh = getattr(module, f"bias_ih_{sfx}"), getattr(module, f"bias_hh_{sfx}")
            k = layer * dirs + d
            h = torch.zeros(B, P, dtype=x.dtype) if h0 is None else h0[k]
            c = torch.zeros(B, H, dtype=x.dtype) if c0 is None else c0[k]
            hs, cs = [None] * T, [None] * T
            for t in reversed(range(T)) if d else range(T):
                a = inp[t] @ Wi.T + bi
                b = h @ Wh.T + bh
                if module.mode == "LSTM":
                    s = a + b
                    i, f = torch.sigmoid(s[:, :H]), torch.sigmoid(s[:, H : 2 * H])
                    g, o = torch.tanh(s[:, 2 * H : 3 * H]), torch.sigmoid(s[:, 3 * H :])
                    c = f * c + i * g
                    h = o * torch.tanh(c)
                    if P != H:
                        h = h @ getattr(module, f"weight_hr_{sfx}").T
                    c.retain_grad()
                    cs[t] = c
                elif module.mode == "GRU":
                    r = torch.sigmoid(a[:, :H] + b[:, :H])
                    z = torch.sigmoid(a[:, H : 2 * H] + b[:, H : 2 * H])
                    n = torch.tanh(a[:, 2 * H :] + r * b[:, 2 * H :])
                    h = (1 - z) * n + z * h
                else:
                    h = torch.tanh(a + b) if module.nonlinearity == "tanh" else torch.relu(a + b)
                h.retain_grad()
                hs[t] = h
            states[sfx] = (hs, cs)
            outs.append(torch.stack(hs))
            h_last.append(hs[0] if d else hs[-1])
            c_last.append(cs[0] if d else cs[-1])
        inp = torch.cat(outs, dim=-1)
    c_n = torch.stack(c_last) if module.mode == "LSTM" else None
    return inp, torch.stack(h_last), c_n, states


def run_probed(module, x, loss_of, probe=None, hx=None):
    probe = probe or RecurrentProbe()
    probe.attach(LayerIndex(module))
    out, state = module(x) if hx is None else module(x, hx)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    loss_of(out, h_n, c_n).backward()
    rec = materialize(probe.collect(0)).get("recurrent", {})
    probe.detach()
    return rec


def weighted_loss(seed_shape_out, seed_shape_h, dtype):
    gen = torch.Generator().manual_seed(1)
    r_out = torch.randn(seed_shape_out, generator=gen, dtype=dtype)
    r_h = torch.randn(seed_shape_h, generator=gen, dtype=dtype)

    def loss(out, h_n, c_n):
        total = (out * r_out).sum() + (h_n * r_h).sum()
        if c_n is not None:
            total = total + (c_n * r_h[..., : c_n.shape[-1]]).sum()
        return total

    return loss


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dh_norm_matches_hand_unrolled(cls, batch_first):
    T, B, In, H = 9, 3, 4, 5
    m = cls(In, H, num_layers=2, bidirectional=True, batch_first=batch_first).double()
    x = torch.randn(B, T, In, dtype=torch.float64)
    x_model = x if batch_first else x.transpose(0, 1)
    loss = weighted_loss((B, T, 2 * H) if batch_first else (T, B, 2 * H), (4, B, H), torch.float64)
    rec = run_probed(m, x_model, loss)["<root>"]

    out, h_n, c_n, states = hand_unroll(m, x.transpose(0, 1))
    ref_out, _ = m(x_model)
    torch.testing.assert_close(out, ref_out if not batch_first else ref_out.transpose(0, 1))
    loss(out if not batch_first else out.transpose(0, 1), h_n, c_n).backward()

    assert set(rec["streams"]) == {"l0", "l0_reverse", "l1", "l1_reverse"}
    for sfx, (hs, cs) in states.items():
        want = [h.grad.norm().item() for h in hs]
        assert rel_err(rec["streams"][sfx]["dh_norm"], want) < 1e-5, sfx
        if cls is nn.LSTM:
            want_c = [c.grad.norm().item() for c in cs]
            assert rel_err(rec["streams"][sfx]["dc_norm"], want_c) < 1e-5, sfx
    assert rec["dh_norm"] == rec["streams"]["l1"]["dh_norm"]
    assert rec["seq_len"] == T and rec["batch"] == B and rec["hidden_size"] == H

    # isolated profile: output gradient kept only at each direction's last processed step
    out, h_n, c_n, states = hand_unroll(m, x.transpose(0, 1))
    keep = torch.zeros(T, 1, 2 * H, dtype=torch.float64)
    keep[-1, :, :H] = 1
    keep[0, :, H:] = 1
    out = out * keep
    loss(out if not batch_first else out.transpose(0, 1), h_n, c_n).backward()
    for sfx, (hs, _) in states.items():
        want = [h.grad.norm().item() for h in hs]
        assert rel_err(rec["streams"][sfx]["dh_norm_last"], want) < 1e-5, sfx


def test_recurrent_path_is_included():
    # Loss on the last output only: a hook on the output sequence would see zero
    # gradient at every t < T-1; the total derivative is non-zero there.
    m = nn.RNN(3, 4).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    rec = run_probed(m, x, lambda out, h, c: out[-1].pow(2).sum())["<root>"]
    out, _, _, states = hand_unroll(m, x)
    out[-1].pow(2).sum().backward()
    want = [h.grad.norm().item() for h in states["l0"][0]]
    assert min(want[:-1]) > 0
    assert rel_err(rec["dh_norm"], want) < 1e-6


def test_isolated_profile_propagates_only_the_last_step():
    m = nn.LSTM(3, 4).double()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    loss = weighted_loss((7, 2, 4), (1, 2, 4), torch.float64)
    rec = run_probed(m, x, loss)["<root>"]
    out, h_n, c_n, states = hand_unroll(m, x)
    # the same loss with the output gradient zeroed before the last step
    keep_last = torch.zeros(7, 1, 1, dtype=torch.float64)
    keep_last[-1] = 1
    loss(out * keep_last, h_n, c_n).backward()
    hs, cs = states["l0"]
    assert rel_err(rec["dh_norm_last"], [h.grad.norm().item() for h in hs]) < 1e-6
    assert rel_err(rec["dc_norm_last"], [c.grad.norm().item() for c in cs]) < 1e-6
    assert rel_err(rec["dh_norm"][:-1], rec["dh_norm_last"][:-1]) > 1e-3  # they do differ


def test_lstm_projection_unbatched_initial_state_and_gates():
    m = nn.LSTM(3, 6, proj_size=2).double()
    x = torch.randn(5, 3, dtype=torch.float64)  # unbatched (T, input)
    h0 = torch.randn(1, 2, dtype=torch.float64)
    c0 = torch.randn(1, 6, dtype=torch.float64)
    rec = run_probed(m, x, lambda out, h, c: out.sum() + c.sum(), hx=(h0, c0))["<root>"]
    out, _, c_n, states = hand_unroll(m, x.unsqueeze(1), h0.unsqueeze(1), c0.unsqueeze(1))
    (out.sum() + c_n.sum()).backward()
    hs, cs = states["l0"]
    assert rel_err(rec["dh_norm"], [h.grad.norm().item() for h in hs]) < 1e-6
    assert rel_err(rec["dc_norm"], [c.grad.norm().item() for c in cs]) < 1e-6
    # forget-gate mean recomputed independently from the weights
    W, U = m.weight_ih_l0, m.weight_hh_l0
    b = m.bias_ih_l0 + m.bias_hh_l0
    h_prev = [h0[0]] + [h.detach()[0] for h in hs[:-1]]
    f = [torch.sigmoid((x[t] @ W.T + h_prev[t] @ U.T + b)[6:12]) for t in range(5)]
    assert rel_err(rec["forget_gate_mean"], [v.mean().item() for v in f]) < 1e-6
    assert rel_err(rec["forget_gate_std"], [v.std(correction=0).item() for v in f]) < 1e-6


def test_gru_update_gate_and_max_batch():
    m = nn.GRU(2, 3, batch_first=True).double()
    x = torch.randn(8, 4, 2, dtype=torch.float64)
    rec = run_probed(m, x, lambda out, h, c: out.pow(2).sum(), probe=RecurrentProbe(max_batch=3))[
        "<root>"
    ]
    out, _, _, states = hand_unroll(m, x.transpose(0, 1))
    out.pow(2).sum().backward()
    assert rec["batch"] == 3
    assert rel_err(rec["dh_norm"], [h.grad[:3].norm().item() for h in states["l0"][0]]) < 1e-6
    W, U = m.weight_ih_l0, m.weight_hh_l0
    hs = [torch.zeros(3, 3, dtype=torch.float64)] + [h.detach()[:3] for h in states["l0"][0]]
    z = [
        torch.sigmoid(
            x[:3, t] @ W[3:6].T + m.bias_ih_l0[3:6] + hs[t] @ U[3:6].T + m.bias_hh_l0[3:6]
        )
        for t in range(4)
    ]
    assert rel_err(rec["update_gate_mean"], [v.mean().item() for v in z]) < 1e-6


def test_relu_rnn_and_spectra_in_record():
    m = nn.RNN(3, 4, nonlinearity="relu").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    rec = run_probed(m, x, lambda out, h, c: out.sum())["<root>"]
    out, _, _, states = hand_unroll(m, x)
    out.sum().backward()
    assert rec["nonlinearity"] == "relu" and rec["kind"] == "rnn"
    assert rel_err(rec["dh_norm"], [h.grad.norm().item() for h in states["l0"][0]]) < 1e-6
    W = m.weight_hh_l0.detach().numpy()
    import numpy as np

    assert rec["sigma_max"] == pytest.approx(np.linalg.norm(W, 2), rel=1e-9)
    assert rec["spectral_radius"] == pytest.approx(max(abs(np.linalg.eigvals(W))), rel=1e-9)


def test_probe_leaves_outputs_and_gradients_bit_identical():
    def train_step(probed):
        torch.manual_seed(3)
        model = nn.Sequential()
        model.rnn = nn.LSTM(4, 8, num_layers=2, bidirectional=True, dropout=0.3)
        head = nn.Linear(16, 1)
        x = torch.randn(12, 5, 4)
        probe = RecurrentProbe()
        if probed:
            probe.attach(LayerIndex(nn.ModuleList([model.rnn, head])))
        out, (h, _) = model.rnn(x)
        y = head(out).sum() + h.sum()
        y.backward()
        rec = probe.collect(0) if probed else {}
        after = torch.randn(3)  # RNG stream must be untouched
        probe.detach()
        grads = [p.grad.clone() for p in [*model.rnn.parameters(), *head.parameters()]]
        return out.detach(), grads, after, rec

    out0, g0, r0, _ = train_step(False)
    out1, g1, r1, rec = train_step(True)
    assert rec["recurrent"]  # the probe did run
    assert torch.equal(out0, out1) and torch.equal(r0, r1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_every_and_recording_schedule():
    m = nn.GRU(2, 3)
    probe = RecurrentProbe(every=2)
    probe.attach(LayerIndex(m))
    got = []
    for step in range(5):
        probe.set_recording(step != 4)
        out, _ = m(torch.randn(4, 2, 2))
        out.sum().backward()
        got.append(bool(probe.collect(step)))
        probe.reset()
    assert got == [True, False, True, False, False]
    probe.detach()
    out, _ = m(torch.randn(4, 2, 2))
    out.sum().backward()
    assert probe.collect(5) == {}


def test_no_gradient_no_record_and_eval_forward():
    m = nn.RNN(2, 3)
    probe = RecurrentProbe()
    probe.attach(LayerIndex(m))
    with torch.no_grad():
        m(torch.randn(4, 1, 2))
    assert probe.collect(0) == {}
    m(torch.randn(4, 1, 2))  # forward with grad, but no backward
    assert probe.collect(1) == {}
    probe.detach()


def test_weights_changed_before_collect_warns_and_skips():
    m = nn.RNN(2, 3)
    probe = RecurrentProbe()
    probe.attach(LayerIndex(m))
    out, _ = m(torch.randn(4, 1, 2))
    out.sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    with pytest.warns(RuntimeWarning, match="before optimizer.step"):
        assert probe.collect(0) == {}
    probe.detach()


def test_packed_sequence_is_skipped_with_warning():
    m = nn.LSTM(2, 3)
    probe = RecurrentProbe()
    probe.attach(LayerIndex(m))
    packed = pack_padded_sequence(torch.randn(5, 2, 2), [5, 3])
    with pytest.warns(RuntimeWarning, match="PackedSequence"):
        out, _ = m(packed)
    out.data.sum().backward()
    assert probe.collect(0) == {}
    probe.detach()


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": 1.5}, {"max_batch": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RecurrentProbe(**kwargs)


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_bias_free_module_equals_zero_bias_module(cls):
    free = cls(3, 4, bias=False).double()
    zero = cls(3, 4).double()
    with torch.no_grad():
        zero.weight_ih_l0.copy_(free.weight_ih_l0)
        zero.weight_hh_l0.copy_(free.weight_hh_l0)
        zero.bias_ih_l0.zero_()
        zero.bias_hh_l0.zero_()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    a = run_probed(free, x, lambda out, h, c: out[-1].pow(2).sum())["<root>"]
    b = run_probed(zero, x, lambda out, h, c: out[-1].pow(2).sum())["<root>"]
    assert rel_err(a["dh_norm"], b["dh_norm"]) < 1e-12


def test_language_model_loss_profile_equals_hand_unrolled():
    # A real training loss (embedding, 2-layer LSTM with carried state, decoder,
    # cross-entropy over every position) through the probe end to end.
    torch.manual_seed(4)
    vocab, T, B = 11, 8, 3
    emb, rnn, dec = nn.Embedding(vocab, 5), nn.LSTM(5, 6, num_layers=2), nn.Linear(6, vocab)
    model = nn.ModuleList([emb, rnn, dec]).double()
    tokens, targets = torch.randint(0, vocab, (T, B)), torch.randint(0, vocab, (T, B))
    h0, c0 = torch.randn(2, B, 6, dtype=torch.float64), torch.randn(2, B, 6, dtype=torch.float64)

    def lm_loss(out):
        return nn.functional.cross_entropy(dec(out).flatten(0, 1), targets.flatten())

    probe = RecurrentProbe()
    probe.attach(LayerIndex(model))
    out, _ = rnn(emb(tokens), (h0, c0))
    lm_loss(out).backward()
    (rec,) = materialize(probe.collect(0))["recurrent"].values()
    probe.detach()

    x = emb(tokens).detach()
    out, _, _, states = hand_unroll(rnn, x, h0, c0)
    lm_loss(out).backward()
    for sfx, (hs, cs) in states.items():
        assert rel_err(rec["streams"][sfx]["dh_norm"], [h.grad.norm().item() for h in hs]) < 1e-6
        assert rel_err(rec["streams"][sfx]["dc_norm"], [c.grad.norm().item() for c in cs]) < 1e-6

    out, _, _, states = hand_unroll(rnn, x, h0, c0)  # the loss at the last position only
    keep_last = torch.zeros(T, 1, 1, dtype=torch.float64)
    keep_last[-1] = 1
    lm_loss(out * keep_last).backward()
    for sfx, (hs, cs) in states.items():
        want = [h.grad.norm().item() for h in hs]
        assert rel_err(rec["streams"][sfx]["dh_norm_last"], want) < 1e-6, sfx
        want_c = [c.grad.norm().item() for c in cs]
        assert rel_err(rec["streams"][sfx]["dc_norm_last"], want_c) < 1e-6, sfx
