import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradmedic
from gradmedic import GradmedicError, Problem
from gradmedic.remedies.surgery import LSTMAsRNN, Residual


def _mlp(depth=20, width=32, act=nn.Sigmoid):
    layers = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _delta_ratio(model, x):
    """||dL/d(first Linear output)|| / ||dL/d(last Linear output)||: the chain product (K1)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outs = {}

    def keep(module, args, out):
        out.retain_grad()
        outs[module] = out

    handles = [m.register_forward_hook(keep) for m in (linears[0], linears[-1])]
    model.zero_grad()
    model(x).sum().backward()
    for h in handles:
        h.remove()
    return float(outs[linears[0]].grad.norm() / outs[linears[-1]].grad.norm())


def _same_weights(a, b):
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


# --- swap_activations ------------------------------------------------------------------------


def test_swap_activations_returns_a_new_model_with_the_same_weights():
    model = _mlp(4, 8)
    new = gradmedic.surgery.swap_activations(model, {nn.Sigmoid: nn.ReLU})
    assert new is not model
    assert [type(m) for m in new][1::2] == [nn.ReLU] * 3
    assert [type(m) for m in model][1::2] == [nn.Sigmoid] * 3  # original untouched
    assert _same_weights(model, new)
    assert all(p is not q for p, q in zip(model.parameters(), new.parameters(), strict=True))
    x = torch.randn(5, 8)
    expected = x  # the original's Linear layers with max(0, .) where the sigmoids were
    for m in model:
        expected = expected.clamp(min=0) if isinstance(m, nn.Sigmoid) else m(expected)
    assert torch.allclose(new(x), expected)


def test_swap_activations_factories_names_and_nesting():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x))

    model = nn.Sequential(Block(), nn.Sequential(nn.Linear(4, 4), nn.ReLU())).double()
    new = gradmedic.surgery.swap_activations(model, {"ReLU": lambda: nn.LeakyReLU(0.2)})
    assert isinstance(new[0].act, nn.LeakyReLU) and new[0].act.negative_slope == 0.2
    assert isinstance(new[1][1], nn.LeakyReLU)
    new2 = gradmedic.surgery.swap_activations(model, {nn.ReLU: "PReLU"})
    assert isinstance(new2[0].act, nn.PReLU) and new2[0].act.weight.dtype == torch.float64
    with pytest.raises(GradmedicError, match="no Tanh module"):
        gradmedic.surgery.swap_activations(model, {nn.Tanh: nn.ReLU})
    with pytest.raises(GradmedicError, match=r"not a torch\.nn module"):
        gradmedic.surgery.swap_activations(model, {"Relu": nn.ReLU})


def test_leaky_relu_swap_gives_dead_units_a_gradient():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
    x = torch.randn(64, 32)
    model(x).sum().backward()
    assert float(model[0].weight.grad.abs().max()) == 0.0
    leaky = gradmedic.surgery.swap_activations(model, {nn.ReLU: lambda: nn.LeakyReLU(0.01)})
    leaky(x).sum().backward()
    # below zero the slope is 0.01: dL/dW0 = 0.01 * W2^T 1 x^T summed over the batch
    expected = 0.01 * model[2].weight.detach().T @ torch.ones(1, 64) @ x
    assert torch.allclose(leaky[0].weight.grad, expected, rtol=1e-4, atol=1e-7)
    assert float(leaky[0].weight.grad.norm()) > 0


# --- add_normalization --------------------------------------------------------------------------


def test_add_normalization_rule_in_sequential():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 2),
    )
    new = gradmedic.surgery.add_normalization(model, kind="batch")
    kinds = [type(m).__name__ for m in new]
    assert kinds == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Flatten",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
    ]  # already-normalized layer left alone; no norm after the output layer
    assert new[1].num_features == 8 and new[5].num_features == 16
    assert _same_weights(
        nn.ModuleList([model[0], model[3], model[8]]), nn.ModuleList([new[0], new[4], new[10]])
    )
    assert len(model) == 9  # original untouched
    assert new(torch.randn(4, 3, 6, 6)).shape == (4, 2)


def test_add_layer_normalization_and_custom_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 5, 6)
            self.out = nn.Linear(6, 1)

        def forward(self, x):
            h = torch.relu(self.conv(x)).flatten(1)
            return self.out(torch.tanh(self.fc(h)))

    model = Net()
    new = gradmedic.surgery.add_normalization(model, kind="layer")
    assert isinstance(new.conv, nn.Sequential) and isinstance(new.conv[1], nn.GroupNorm)
    assert new.conv[1].num_groups == 1 and new.conv[1].num_channels == 4
    assert isinstance(new.fc[1], nn.LayerNorm) and new.fc[1].normalized_shape == (6,)
    assert isinstance(new.out, nn.Linear)
    x = torch.randn(3, 2, 5)
    pre = {}
    new.fc[1].register_forward_hook(lambda m, a, o: pre.setdefault("fc", o))
    assert new(x).shape == (3, 1)
    # LayerNorm output: zero mean, unit variance per sample (gain 1, shift 0 at init)
    assert torch.allclose(pre["fc"].mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(pre["fc"].var(1, unbiased=False), torch.ones(3), atol=1e-3)
    with pytest.raises(GradmedicError, match="kind"):
        gradmedic.surgery.add_normalization(model, kind="group")
    with pytest.raises(GradmedicError, match="at least two"):
        gradmedic.surgery.add_normalization(nn.Linear(3, 3))


# --- residualize ----------------------------------------------------------------------------------


def test_residualize_wraps_shape_preserving_blocks():
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Dropout(0.0),
        nn.Linear(8, 8),
        nn.Linear(8, 2),
    )
    new = gradmedic.surgery.residualize(model)
    assert [type(m).__name__ for m in new] == ["Linear", "Tanh", "Residual", "Residual", "Linear"]
    assert [type(m).__name__ for m in new[2].fn] == ["Linear", "Tanh", "Dropout"]
    assert _same_weights(model, new)
    x = torch.randn(5, 4)
    h = torch.tanh(model[0](x))
    h = h + torch.tanh(model[2](h))
    h = h + model[5](h)
    assert torch.allclose(new(x), model[6](h), atol=1e-6)
    assert isinstance(model[2], nn.Linear)  # original untouched


def test_residualize_convs_and_errors():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 5, padding="same"),
    )
    new = gradmedic.surgery.residualize(model)
    assert [type(m).__name__ for m in new] == ["Conv2d", "ReLU", "Residual", "Conv2d", "Residual"]
    assert new(torch.randn(1, 3, 8, 8)).shape == (1, 8, 4, 4)
    with pytest.raises(GradmedicError, match="shape-preserving"):
        gradmedic.surgery.residualize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(GradmedicError, match="shape-preserving"):
        gradmedic.surgery.residualize(new)  # already residual: nothing left to wrap
    assert isinstance(Residual(nn.Identity())(torch.ones(2)), torch.Tensor)


# --- gate_recurrent -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, batch_first=True), dict(bidirectional=True, num_layers=2)],
    ids=["plain", "2-layer-batch-first", "bidirectional"],
)
def test_gate_recurrent_keeps_the_rnn_signature(kind, config):
    rnn = nn.RNN(3, 5, **config)
    gated = gradmedic.surgery.gate_recurrent(rnn, kind)
    inner = gated.lstm if kind == "lstm" else gated
    assert isinstance(inner, nn.LSTM if kind == "lstm" else nn.GRU)
    for attr in ("input_size", "hidden_size", "num_layers", "batch_first", "bidirectional"):
        assert getattr(inner, attr) == getattr(rnn, attr)
    x = torch.randn(2, 7, 3) if rnn.batch_first else torch.randn(7, 2, 3)
    h0 = torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), 2, 5)
    for args in ((x,), (x, h0)):
        out_r, h_r = rnn(*args)
        out_g, h_g = gated(*args)
        assert out_g.shape == out_r.shape and h_g.shape == h_r.shape


def test_gate_recurrent_inside_a_model_and_packed_input():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(4, 6, batch_first=True, nonlinearity="relu")
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.head(h[-1])

    model = Tagger()
    new = gradmedic.surgery.gate_recurrent(model, "lstm")
    assert isinstance(new.rnn, LSTMAsRNN) and isinstance(model.rnn, nn.RNN)
    assert torch.equal(new.head.weight, model.head.weight)
    assert new(torch.randn(3, 5, 4)).shape == (3, 2)
    # forget bias 1 by default (b_if + b_hf)
    b = new.rnn.lstm.bias_ih_l0 + new.rnn.lstm.bias_hh_l0
    assert torch.allclose(b[6:12], torch.ones(6))
    packed = pack_padded_sequence(torch.randn(3, 5, 4), [5, 3, 2], batch_first=True)
    _, h = new.rnn(packed)
    assert h.shape == (1, 3, 6)
    with pytest.raises(GradmedicError, match=r"no nn\.RNN"):
        gradmedic.surgery.gate_recurrent(nn.Linear(2, 2), "gru")
    with pytest.raises(GradmedicError, match="kind"):
        gradmedic.surgery.gate_recurrent(model, "transformer")


def _per_step_gain(rnn, steps=30):
    """Geometric-mean factor by which ||dL/dx_t|| grows per step back in time.

    The loss reads only the last step, so x_t's gradient crossed T-1-t recurrent steps.
    """
    x = torch.randn(4, steps, 8, requires_grad=True)
    out, _ = rnn(x)
    out[:, -1].pow(2).sum().backward()
    g = x.grad.norm(dim=(0, 2))
    return float((g[0] / g[-1]) ** (1 / (steps - 1)))


def _exploding_rnn():
    rnn = nn.RNN(8, 16, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0)
        rnn.weight_hh_l0.mul_(2.0)  # every singular value 2: ||dh|| grows ~2x per active step
    return rnn


def test_exploding_rnn_cured_by_gating_and_bounded_by_clipping():
    rnn = _exploding_rnn()
    assert _per_step_gain(rnn) > 1.3
    for kind in ("lstm", "gru"):
        gated = gradmedic.surgery.gate_recurrent(rnn, kind)
        gain = _per_step_gain(gated)
        assert 0.0 < gain <= 1.0
    rnn.zero_grad()
    out, _ = rnn(torch.randn(4, 30, 8))
    out[:, -1].pow(2).sum().backward()
    total = gradmedic.clip_grad_norm_(rnn.parameters(), max_norm=1.0)
    assert float(total) > 1e6
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in rnn.parameters()]))
    assert float(after) == pytest.approx(1.0, rel=1e-5)


class _LastStep(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _in_time_findings(model):
    with gradmedic.watch(model, recurrent=True) as monitor:
        model(torch.randn(4, 30, 8)).pow(2).sum().backward()
        monitor.step()
        return monitor.diagnose()


def test_monitor_no_longer_finds_exploding_in_time():
    model = _LastStep(_exploding_rnn())
    assert _in_time_findings(model).has(Problem.EXPLODING_IN_TIME)
    for kind in ("lstm", "gru"):
        gated = gradmedic.surgery.gate_recurrent(model, kind)
        assert not _in_time_findings(gated).has(Problem.EXPLODING_IN_TIME)
    # At forget bias 1 the LSTM's gradient decays ~0.8x per step (vanishing over 30 steps);
    # a forget gate nearer 1 (bias 2: sigmoid = 0.88) carries it across the sequence.
    gated = gradmedic.surgery.gate_recurrent(model, "lstm", forget_bias=2.0)
    assert _in_time_findings(gated).healthy


# --- the sigmoid stack (K2) and its cures ---------------------------------------------------------


@pytest.fixture
def sigmoid_stack():
    return _mlp(20, 32, nn.Sigmoid), torch.randn(64, 32), torch.randn(64, 1)


def test_sigmoid_stack_vanishes_and_each_remedy_cures_it(sigmoid_stack):
    model, x, _ = sigmoid_stack
    assert _delta_ratio(model, x) < 1e-6
    relu = gradmedic.surgery.swap_activations(model, {nn.Sigmoid: nn.ReLU})
    gradmedic.init.apply(relu, "he")
    cured = {
        "he+relu": relu,
        "batch_norm": gradmedic.surgery.add_normalization(model, kind="batch"),
        "residual": gradmedic.surgery.residualize(model),
    }
    for name, new in cured.items():
        assert 0.05 <= _delta_ratio(new, x) <= 20, name
    assert _delta_ratio(model, x) < 1e-6  # the original is untouched


def test_check_no_longer_finds_vanishing(sigmoid_stack):
    model, x, y = sigmoid_stack
    assert gradmedic.check(model, x, y).has(Problem.VANISHING)
    relu = gradmedic.surgery.swap_activations(model, {nn.Sigmoid: nn.ReLU})
    gradmedic.init.apply(relu, "he")
    for new in (
        relu,
        gradmedic.surgery.add_normalization(model, kind="batch"),
        gradmedic.surgery.residualize(model),
    ):
        assert not gradmedic.check(new, x, y).has(Problem.VANISHING)
