import math

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic import GradmedicError, Problem


def _mlp(depth, width, act):
    layers = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _delta_norms(model, x):
    """||dL/d(output)|| of every Linear, input side first (the chain product, K1)."""
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(keep) for m in linears]
    model.zero_grad()
    model(x).sum().backward()
    for h in handles:
        h.remove()
    return [float(o.grad.norm()) for o in outs]


# --- the formulas ----------------------------------------------------------------------


def test_xavier_variances_and_untouched_modules():
    model = nn.Sequential(
        nn.Embedding(10, 256), nn.Linear(256, 512), nn.BatchNorm1d(512), nn.Linear(512, 256)
    )
    with torch.no_grad():
        model[2].weight.fill_(3.0)
    emb = model[0].weight.detach().clone()
    report = gradmedic.init.apply(model, "xavier")
    assert report.layers == ["1", "3"] and report.gains == {"1": 1.0, "3": 1.0}
    bound = math.sqrt(6 / (256 + 512))
    for layer in (model[1], model[3]):
        w = layer.weight.detach()
        assert float(w.abs().max()) <= bound
        assert float(w.var()) == pytest.approx(2 / (256 + 512), rel=0.03)
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.equal(model[0].weight, emb)  # embeddings never touched
    assert torch.all(model[2].weight == 3.0)  # norms never touched

    gradmedic.init.apply(model, "xavier_normal", gain=2.0)
    assert float(model[1].weight.detach().std()) == pytest.approx(
        2.0 * math.sqrt(2 / 768), rel=0.03
    )


def test_he_uses_the_following_activation():
    model = nn.Sequential(
        nn.Linear(400, 400),
        nn.ReLU(),
        nn.Linear(400, 400),
        nn.LeakyReLU(0.2),
        nn.Linear(400, 400),
        nn.BatchNorm1d(400),  # skipped over: the activation after the norm counts
        nn.Tanh(),
        nn.Linear(400, 400),
        nn.SELU(),
        nn.Linear(400, 10),
    )
    report = gradmedic.init.apply(model, "he")
    assert report.details["nonlinearity"] == {
        "0": "relu",
        "2": "leaky_relu",
        "4": "tanh",
        "7": "selu",
        "9": "linear",
    }
    expected_gain = {
        "0": math.sqrt(2),
        "2": math.sqrt(2 / (1 + 0.2**2)),
        "4": 5 / 3,
        "7": 3 / 4,
        "9": 1.0,
    }
    for name, g in expected_gain.items():
        assert report.gains[name] == pytest.approx(g)
        w = model.get_submodule(name).weight.detach()
        assert float(w.std()) == pytest.approx(g / math.sqrt(400), rel=0.03)


def test_he_falls_back_to_relu_without_activation_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(300, 300)
            self.b = nn.Linear(300, 300)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Functional()
    report = gradmedic.init.apply(model, "kaiming")
    assert report.details["nonlinearity"] == {"a": "relu", "b": "relu"}
    assert float(model.a.weight.detach().std()) == pytest.approx(math.sqrt(2 / 300), rel=0.03)


def test_orthogonal_and_recurrent_gate_blocks():
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    gradmedic.init.apply(model, "orthogonal", gain=1.5)
    w = model[0].weight
    assert torch.allclose(w @ w.T, 2.25 * torch.eye(32), atol=1e-5)

    lstm = nn.LSTM(8, 16, num_layers=2)
    gru = nn.GRU(8, 16)
    gradmedic.init.apply(lstm, "orthogonal")
    gradmedic.init.apply(gru, "orthogonal")
    for rnn, gates in ((lstm, 4), (gru, 3)):
        for block in rnn.weight_hh_l0.chunk(gates, 0):  # each gate's 16x16 block is orthogonal
            assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
        for block in rnn.weight_ih_l0.chunk(gates, 0):  # 16x8: orthonormal columns
            assert torch.allclose(block.T @ block, torch.eye(8), atol=1e-5)
        assert torch.count_nonzero(rnn.bias_ih_l0) == 0
    # but the whole 64x16 LSTM matrix is not just one orthogonal_ call: blocks are separate
    assert not torch.allclose(lstm.weight_hh_l0.T @ lstm.weight_hh_l0, torch.eye(16), atol=1e-3)


def test_lecun_std_and_conv_fan_in():
    conv = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU())
    gradmedic.init.apply(conv, "lecun")
    fan_in = 16 * 3 * 3
    assert float(conv[0].weight.detach().std()) == pytest.approx(1 / math.sqrt(fan_in), rel=0.03)


def test_lsuv_reaches_unit_output_variance():
    model = nn.Sequential(
        nn.Linear(20, 64),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(64, 64),
        nn.Tanh(),
        nn.Linear(64, 5),
    )
    model.train()
    x = torch.randn(256, 20) * 5
    with pytest.raises(GradmedicError, match="data="):
        gradmedic.init.apply(model, "lsuv")
    report = gradmedic.init.apply(model, "lsuv", data=x, tol=0.05, max_iter=20)
    assert report.layers == ["0", "3", "5"]
    assert model.training and model[2].training  # modes restored
    model.eval()
    outs = {}
    for name in report.layers:
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: outs.__setitem__(name, o)
        )
    with torch.no_grad():
        model(x)
    for name in report.layers:
        assert abs(float(outs[name].var()) - 1) < 0.05
        assert report.details["variance"][name] == pytest.approx(float(outs[name].var()), rel=1e-5)
    # the first layer had to be scaled down: inputs have variance 25
    assert report.gains["0"] < 0.5


def test_bias_scheme_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1, bias=False))
    w = model[0].weight.detach().clone()
    report = gradmedic.init.apply(model, "bias", value=0.01)
    assert report.layers == ["0"]
    assert torch.all(model[0].bias == 0.01) and torch.equal(model[0].weight, w)
    with pytest.raises(GradmedicError, match="value="):
        gradmedic.init.apply(model, "bias")
    with pytest.raises(GradmedicError, match=r"unknown init scheme 'glorot'.*xavier"):
        gradmedic.init.apply(model, "glorot")
    with pytest.raises(GradmedicError, match="no Linear"):
        gradmedic.init.apply(nn.Sequential(nn.LayerNorm(3)), "he")
    with pytest.raises(TypeError, match="model"):
        gradmedic.init.apply("model", "he")


def test_forget_gate_bias():
    model = nn.ModuleDict(
        {"lstm": nn.LSTM(3, 5, num_layers=2, bidirectional=True), "cell": nn.LSTMCell(3, 5)}
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = gradmedic.init.forget_gate_bias_(model, 2.0)
    assert sorted(report.layers) == ["cell", "lstm"]
    lstm, cell = model["lstm"], model["cell"]
    for ih, hh in (
        (lstm.bias_ih_l0, lstm.bias_hh_l0),
        (lstm.bias_ih_l1_reverse, lstm.bias_hh_l1_reverse),
        (cell.bias_ih, cell.bias_hh),
    ):
        assert torch.allclose(ih[5:10] + hh[5:10], torch.full((5,), 2.0))
    for name, p in model.named_parameters():
        if "bias" in name:  # the input, cell and output gate blocks are untouched
            keep = torch.cat([p[:5], p[10:]])
            assert torch.equal(keep, torch.cat([before[name][:5], before[name][10:]]))
        else:
            assert torch.equal(p, before[name])
    with pytest.raises(GradmedicError, match="LSTM"):
        gradmedic.init.forget_gate_bias_(nn.GRU(3, 5))
    with pytest.raises(GradmedicError, match="bias=False"):
        gradmedic.init.forget_gate_bias_(nn.LSTM(3, 5, bias=False))


def test_forget_bias_keeps_the_cell_state():
    # with input and hidden weights at zero, f = sigmoid(value), so c_T = sigmoid(value)^T c_0
    lstm = nn.LSTMCell(2, 3)
    with torch.no_grad():
        for p in lstm.parameters():
            p.zero_()
    gradmedic.init.forget_gate_bias_(lstm, 3.0)
    h, c = torch.zeros(1, 3), torch.ones(1, 3)
    for _ in range(10):
        h, c = lstm(torch.zeros(1, 2), (h, c))
    assert torch.allclose(c, torch.full((1, 3), (1 / (1 + math.exp(-3.0))) ** 10), rtol=1e-5)


# --- each remedy, on the setup it cures -------------------------------------------------


def test_he_init_cures_exploding_relu_mlp():
    model = _mlp(20, 32, nn.ReLU)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0)  # variance 1 instead of 2/fan_in = 1/16
    x = torch.randn(64, 32)
    d = _delta_norms(model, x)
    assert d[0] / d[-1] > 1e6  # each layer multiplies the delta by ~sqrt(32/2) = 4
    gradmedic.init.apply(model, "he")
    d = _delta_norms(model, x)
    assert 0.05 <= d[0] / d[-1] <= 20


def test_bias_reinit_revives_dead_relus():
    model = nn.Sequential(
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
        model[2].bias.fill_(-10.0)
    x = torch.randn(64, 32)
    model(x).sum().backward()
    assert float(model[0].weight.grad.abs().max()) == 0.0  # every unit dead: no gradient
    gradmedic.init.apply(model, "bias", value=0.01)
    model.zero_grad()
    model(x).sum().backward()
    assert float(model[0].weight.grad.norm()) > 1e-3
    assert float(model[2].weight.grad.norm()) > 1e-3


def test_check_finding_disappears():
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    relu = _mlp(20, 32, nn.ReLU)
    with torch.no_grad():
        for m in relu:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0)
    assert gradmedic.check(relu, x, y).has(Problem.EXPLODING)
    gradmedic.init.apply(relu, "he")
    assert not gradmedic.check(relu, x, y).has(Problem.EXPLODING)

    dead = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        dead[0].bias.fill_(-10.0)
    assert gradmedic.check(dead, x, y).has(Problem.DEAD_UNITS)
    gradmedic.init.apply(dead, "bias", value=0.01)
    assert not gradmedic.check(dead, x, y).has(Problem.DEAD_UNITS)
