"""Real tiny models trained a few steps under the monitor: labelled problems and their
healthy twins (LoRA + AdamW, zero-init residual, pre-LN transformer at a sane lr,
default LSTM on a short sequence, He ReLU MLP, BN CNN).

The twins must give no finding at all; the problems must be named, with their
first cause first and numbers a practitioner would try. Every remedy call of every
diagnosis here is executed as pasted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from cases import classification, cnn_bn, he, images, mlp, normal
from gradmedic.findings import Problem


def train(model, make_opt, x, y, steps=30, loss_fn=nn.functional.cross_entropy, **watch):
    """SGD-style loop; batches from ``x(t), y(t)`` when callable. Returns (diagnosis, opt)."""
    opt = make_opt(model)
    with gradmedic.watch(model, opt, update_every=1, **watch) as mon:
        for t in range(steps):
            xb, yb = (x(t), y(t)) if callable(x) else (x, y)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            mon.note_loss(loss)
            loss.backward()
            opt.step()
        return mon.diagnose(), opt


# ---- a pre-LN transformer LM, trained by hand (manual SGD, clip 0.25) like the word LM


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 32, blocks: int = 2, t: int = 16) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList([Block(d, 2) for _ in range(blocks)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def train_lm(lr: float, steps: int = 30):
    torch.manual_seed(0)
    vocab, t = 1000, 16
    model = LM(vocab, t=t)
    data = torch.randint(0, vocab, (400, t + 1), generator=torch.Generator().manual_seed(1))
    pick = torch.Generator().manual_seed(2)
    with gradmedic.watch(model, update_every=1) as mon:
        for _ in range(steps):
            b = data[torch.randint(0, 400, (16,), generator=pick)]
            logits = model(b[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1))
            model.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            mon.step(loss=loss)
        return mon.diagnose(), model


# ---- the twins: no finding at all


class LoRALinear(nn.Module):
    """A frozen base layer plus a rank-4 update ``B A`` with ``B = 0`` at the start."""

    def __init__(self, n_in: int, n_out: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(n_in, n_out).requires_grad_(False)
        self.lora_A = nn.Linear(n_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, n_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class ZeroInitBranch(nn.Module):
    """``x + W2 relu(W1 x)`` with ``W2 = 0``: the block starts as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class LastStep(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


def lora_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(32, 64), nn.ReLU(), LoRALinear(64, 64), nn.ReLU(),
                          LoRALinear(64, 10))  # fmt: skip
    _, x, y = classification(model, 32, 10)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return train(model, lambda m: torch.optim.AdamW(trainable, lr=1e-3), x, y)[0]


def zero_init_residual():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), *[ZeroInitBranch(64) for _ in range(6)],
                          nn.Linear(64, 10))  # fmt: skip
    _, x, y = classification(model, 32, 10)
    return train(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), x, y)[0]


def lstm_short():
    torch.manual_seed(0)
    model = LastStep(nn.LSTM(8, 32))  # PyTorch's default init: forget gate ~0.5
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(10, 16, 8, generator=gen) for _ in range(20)]
    return train(
        model, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), lambda t: xs[t],
        lambda t: xs[t][0, :, :1], steps=20, loss_fn=nn.functional.mse_loss, recurrent=True,
    )[0]  # fmt: skip


def he_relu_mlp():
    torch.manual_seed(0)
    model = mlp([32, 128, 128, 128, 10], nn.ReLU, he)
    _, x, y = classification(model, 32, 10)
    return train(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), x, y)[0]


def bn_cnn():
    torch.manual_seed(0)
    model, x, y = images(cnn_bn())
    return train(model, lambda m: torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), x, y,
                 steps=10, activations=True)[0]  # fmt: skip


def zero_init_head():
    torch.manual_seed(0)
    model = mlp([32, 64, 64, 64, 10], nn.ReLU, he)
    nn.init.zeros_(model[-1].weight)  # a common head init: every delta below it is 0 at step 0
    nn.init.zeros_(model[-1].bias)
    _, x, y = classification(model, 32, 10)
    return train(model, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), x, y)[0]


TWINS = {
    "zero_init_head": zero_init_head,
    "lora_adamw": lora_adamw,
    "zero_init_residual": zero_init_residual,
    "pre_ln_transformer_sane_lr": lambda: train_lm(0.5)[0],
    "lstm_short_sequence": lstm_short,
    "he_relu_mlp": he_relu_mlp,
    "bn_cnn": bn_cnn,
}


@pytest.mark.parametrize("name", list(TWINS))
def test_healthy_twins_have_no_finding(name):
    d = TWINS[name]()
    assert d.status == "healthy" and d.healthy, [f.explanation for f in d.findings]
    assert d.coverage.steps > 0


def test_lora_step_zero_update_ratio_is_set_aside_not_called_unstable():
    d = lora_adamw()
    assert any("0.lora_B (step 0)" in note for note in d.coverage.notes)


# ---- the problems


def test_explosion_then_nan_names_the_explosion_first_with_init():
    torch.manual_seed(0)
    model = mlp([256] * 8 + [10], nn.ReLU, normal(1.0))  # delta x sqrt(128) per layer
    _, x, y = classification(model, 256, 10)
    d, _ = train(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.01), x, y, steps=6)
    assert d.chain[0].problem is Problem.EXPLODING and d.chain[0].step == 0
    assert d.chain[-1].problem is Problem.NONFINITE and d.chain[-1].step == 1
    root = d.root_cause
    assert root is d.findings[0] and root.remedies[0].name == "he_init"
    for f in d.findings:
        for r in f.remedies:
            if r.name == "lower_lr":
                assert 0.01 <= r.params["factor"] <= 0.5  # not "1e+16x"
            if r.name == "clip_norm":
                assert r.params["max_norm"] == 1.0  # nothing finite came before step 0


def test_transformer_lm_at_a_too_large_lr_diverges_and_is_not_vanishing():
    d, _ = train_lm(100.0)
    assert Problem.DIVERGENCE in d.problems
    assert not d.problems & {Problem.VANISHING, Problem.EXPLODING}
    f = d.by_problem("divergence")[0]
    assert f.evidence["loss_ratio"] >= 3
    assert f.evidence["existing_clip"] == pytest.approx(0.25, rel=1e-5)
    first = f.remedies[0]
    assert first.name == "lower_lr" and first.call.startswith("lr = lr * ")  # no optimizer
    assert not any(r.name == "clip_norm" for g in d.findings for r in g.remedies)
    assert not any("param_groups" in r.call for g in d.findings for r in g.remedies)


def test_a_loop_that_never_calls_step_is_not_healthy():
    model = mlp([8, 16, 4], nn.ReLU, he)
    with gradmedic.watch(model) as mon:
        for _ in range(3):
            model(torch.randn(5, 8)).pow(2).mean().backward()  # forgot monitor.step()
        d = mon.diagnose()
    assert not d.healthy and d.status == "no_records"
    assert "monitor.step" in d.warnings[0]


def test_a_model_without_parameters_is_not_healthy():
    with gradmedic.watch(nn.Sequential(nn.ReLU())) as mon:
        x = torch.randn(4, requires_grad=True)
        nn.functional.relu(x).sum().backward()
        mon.step()
        d = mon.diagnose()
    assert not d.healthy and "no parameter" in d.warnings[0]


def test_adamw_at_a_too_large_lr_is_not_told_to_use_adam():
    torch.manual_seed(0)
    model = mlp([32, 128, 128, 128, 10], nn.ReLU, he)
    _, x, y = classification(model, 32, 10)
    d, _ = train(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1.0), x, y, steps=15)
    assert not d.healthy
    names = {r.name for f in d.findings for r in f.remedies}
    assert "lower_lr" in names and "adaptive_optimizer" not in names


# ---- every pasted remedy runs as is


def _diagnoses():
    torch.manual_seed(0)
    sig = mlp([64] + [64] * 11 + [10], nn.Sigmoid)
    x = torch.randn(16, 64)
    yield gradmedic.check(sig, x, torch.randint(0, 10, (16,))), sig, None, x
    torch.manual_seed(0)
    boom = mlp([256] * 8 + [10], nn.ReLU, normal(1.0))
    _, xb, yb = classification(boom, 256, 10)
    d, opt = train(boom, lambda m: torch.optim.SGD(m.parameters(), lr=0.01), xb, yb, steps=4)
    yield d, boom, opt, xb
    d, lm = train_lm(100.0, steps=20)
    yield d, lm, None, None


def test_every_remedy_call_runs_as_pasted_and_rebinds_what_it_returns():
    seen = 0
    for d, model, opt, batch in _diagnoses():
        assert d.findings
        for f in d.findings:
            for r in f.remedies:
                namespace = {
                    "torch": torch, "nn": nn, "gradmedic": gradmedic, "model": model,
                    "optimizer": opt or torch.optim.SGD(model.parameters(), lr=0.1),
                    "batch": batch, "h": torch.zeros(2, requires_grad=True), "lr": 0.1, "step": 0,
                }  # fmt: skip
                exec(r.call, namespace)  # the point of the test
                seen += 1
                if r.call.startswith("model = "):
                    assert namespace["model"] is not model  # the returned copy is kept
                if r.name == "lower_lr" and r.call.startswith("lr = "):
                    assert namespace["lr"] == pytest.approx(0.1 * r.params["factor"])
    assert seen >= 6
