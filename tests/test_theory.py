import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from gradmedic import theory
from gradmedic.errors import GradmedicError
from gradmedic.theory import (
    ACTIVATIONS,
    chi,
    chi_at,
    depth_scale,
    fixed_point,
    fixed_point_kind,
    gaussian_expectation,
    get_activation,
    predicted_gain,
    sigmoid_chain_bound,
    variance_map,
)

TORCH_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": torch.relu,
    "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.01),
    "elu": torch.nn.functional.elu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


def _gauss_quad(f, q):
    """E_z[f(sqrt(q) z)] by scipy.integrate.quad, split at the kink at 0."""
    s = math.sqrt(q)

    def integrand(z):
        return float(f(np.array(s * z))) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    return (
        quad(integrand, -np.inf, 0.0, epsabs=0, epsrel=1e-12)[0]
        + quad(integrand, 0.0, np.inf, epsabs=0, epsrel=1e-12)[0]
    )


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_and_derivative_match_torch(name):
    act = get_activation(name)
    x = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    x = x[x.abs() > 1e-9]  # the kink at 0 has no derivative
    x.requires_grad_(True)
    y = TORCH_ACTIVATIONS[name](x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    xs = x.detach().numpy()
    np.testing.assert_allclose(act.fn(xs), y.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(act.derivative(xs), grad.numpy(), rtol=1e-10, atol=1e-12)


def test_activation_parameters_and_errors():
    act = get_activation("leaky_relu", slope=0.2)
    np.testing.assert_allclose(act.fn(np.array([-1.0, 2.0])), [-0.2, 2.0])
    np.testing.assert_allclose(
        get_activation("elu", alpha=2.0).derivative(np.array(-1.0)), 2 / math.e
    )
    assert get_activation("Identity").name == "linear"
    with pytest.raises(GradmedicError, match="unknown activation 'swishy'"):
        get_activation("swishy")
    with pytest.raises(GradmedicError, match="does not take parameters"):
        get_activation("tanh", slope=0.1)
    with pytest.raises(TypeError, match="activation must be"):
        get_activation(3)


# ---------------------------------------------------------------- quadrature


@pytest.mark.parametrize(
    ("name", "q"), [("tanh", 0.7), ("elu", 2.5), ("gelu", 1.0), ("sigmoid", 9.0), ("tanh", 1e4)]
)
def test_quadrature_matches_scipy_quad(name, q):
    act = get_activation(name)
    for f in (lambda x: act.fn(x) ** 2, lambda x: act.derivative(x) ** 2):
        assert float(gaussian_expectation(f, q)) == pytest.approx(_gauss_quad(f, q), rel=1e-9)


def test_quadrature_limits_at_zero_and_infinity():
    relu_d2 = lambda x: get_activation("relu").derivative(x) ** 2  # noqa: E731
    assert float(gaussian_expectation(relu_d2, 0.0)) == pytest.approx(0.5, abs=1e-14)
    assert float(gaussian_expectation(relu_d2, math.inf)) == pytest.approx(0.5, abs=1e-14)
    sig = get_activation("sigmoid")
    assert float(gaussian_expectation(lambda x: sig.fn(x) ** 2, 0.0)) == pytest.approx(0.25)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("sigma_w", [0.5, 1.0, 2**0.5, 1.7])
@pytest.mark.parametrize("sigma_b", [0.0, 0.3])
def test_relu_and_linear_chi_closed_forms(sigma_w, sigma_b):
    assert chi("relu", sigma_w, sigma_b) == pytest.approx(sigma_w**2 / 2, rel=1e-13)
    assert chi("leaky_relu", sigma_w, sigma_b) == pytest.approx(
        sigma_w**2 * (1 + 0.01**2) / 2, rel=1e-13
    )
    assert chi("linear", sigma_w, sigma_b) == pytest.approx(sigma_w**2, rel=1e-13)
    assert chi_at("relu", 123.0, sigma_w) == pytest.approx(sigma_w**2 / 2, rel=1e-13)


def test_relu_fixed_points():
    # V(q) = sigma_w^2 q / 2 + sigma_b^2 is linear: q* = sigma_b^2 / (1 - sigma_w^2 / 2)
    assert fixed_point("relu", 1.0, 0.5) == pytest.approx(0.25 / 0.5, rel=1e-10)
    assert fixed_point("relu", 1.2, 0.0) == 0.0
    assert fixed_point_kind("relu", 1.2, 0.0) == "zero"
    assert fixed_point("relu", 1.5, 0.0) == math.inf
    assert fixed_point_kind("relu", 2**0.5, 0.1) == "infinite"  # slope 1 plus a constant
    assert fixed_point("relu", 2**0.5, 0.0, q0=3.0) == 3.0  # every q is fixed
    assert fixed_point_kind("relu", 2**0.5, 0.0) == "neutral"
    assert fixed_point("linear", 0.8, 0.3) == pytest.approx(0.09 / (1 - 0.64), rel=1e-10)


def test_tanh_critical_point():
    # sigma_w = 1, sigma_b = 0 is the edge of chaos: q* -> 0 and chi -> 1
    assert fixed_point("tanh", 1.0, 0.0) == 0.0
    assert chi("tanh", 1.0, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert theory.phase(chi("tanh", 1.0, 0.0)) == "critical"
    assert depth_scale("tanh", 1.0, 0.0).xi_grad == math.inf
    # approaching from the chaotic side q* -> 0+ and chi -> 1+
    q_near = fixed_point("tanh", 1.01, 0.0)
    assert 0 < q_near < 0.02
    assert 1 < chi("tanh", 1.01, 0.0) < 1.001 + 1e-3
    assert fixed_point("tanh", 0.9, 0.0) == 0.0
    assert chi("tanh", 0.9, 0.0) == pytest.approx(0.81, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "sigma_w", "sigma_b"), [("tanh", 1.5, 0.3), ("sigmoid", 4.0, 0.0), ("gelu", 1.5, 0.1)]
)
def test_fixed_point_is_the_limit_of_iteration_and_chi_uses_it(name, sigma_w, sigma_b):
    q = 1.0
    for _ in range(300):
        q = float(variance_map(name, q, sigma_w, sigma_b))
    q_star = fixed_point(name, sigma_w, sigma_b)
    assert q_star == pytest.approx(q, rel=1e-8)
    act = get_activation(name)
    expected = sigma_w**2 * _gauss_quad(lambda x: act.derivative(x) ** 2, q_star)
    assert chi(name, sigma_w, sigma_b) == pytest.approx(expected, rel=1e-8)


def test_sigmoid_variance_map_uses_raw_second_moment():
    # E[sigmoid(h)^2] with no mean subtracted: at q = 0 it is sigmoid(0)^2 = 1/4
    assert float(variance_map("sigmoid", 0.0, 2.0, 0.1)) == pytest.approx(4 * 0.25 + 0.01)


def test_depth_scales():
    # ReLU, sigma_b = 0, sigma_w^2 < 2: q_l = (sigma_w^2 / 2)^l q0, so xi_q = xi_grad = 1/|log chi|
    s = depth_scale("relu", 1.2)
    assert s.xi_q == pytest.approx(1 / abs(math.log(0.72)), rel=1e-9)
    assert s.xi_grad == pytest.approx(1 / abs(math.log(0.72)), rel=1e-12)
    assert math.isnan(depth_scale("relu", 1.5).xi_q)  # q -> inf: no convergence scale
    # xi_q = -1/log V'(q*): compare with the observed convergence rate of the iteration
    q_star = fixed_point("tanh", 1.5, 0.3)
    q, gaps = 3.0, []
    for _ in range(12):
        q = float(variance_map("tanh", q, 1.5, 0.3))
        gaps.append(q - q_star)
    rate = gaps[-1] / gaps[-2]
    assert depth_scale("tanh", 1.5, 0.3).xi_q == pytest.approx(-1 / math.log(rate), rel=1e-4)
    # chaotic tanh, sigma_b = 0: c* = 0 by symmetry, chi_c* = sigma_w^2 E[tanh'(h)]^2
    q_star = fixed_point("tanh", 1.5, 0.0)
    mean_d = _gauss_quad(get_activation("tanh").derivative, q_star)
    expected_xi_c = -1 / math.log(1.5**2 * mean_d**2)
    assert depth_scale("tanh", 1.5, 0.0).xi_c == pytest.approx(expected_xi_c, rel=1e-7)
    # ordered phase: c* = 1, so xi_c equals the gradient depth scale
    ordered = depth_scale("tanh", 0.9, 0.2)
    assert ordered.xi_c == ordered.xi_grad


def test_sigmoid_chain_bound():
    assert sigmoid_chain_bound(0) == 1.0
    assert sigmoid_chain_bound(10) == pytest.approx(4.0**-10)
    x = np.linspace(-10, 10, 20001)
    assert get_activation("sigmoid").derivative(x).max() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="depth"):
        sigmoid_chain_bound(-1)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="sigma_w must be a finite number >= 0"):
        chi("tanh", -1.0)
    with pytest.raises(ValueError, match="sigma_b"):
        fixed_point("tanh", 1.0, math.nan)
    with pytest.raises(ValueError, match="q0 must be > 0"):
        fixed_point("tanh", 1.0, q0=0.0)
    with pytest.raises(TypeError, match="sigma_w must be a number"):
        chi("tanh", "1.0")
    with pytest.raises(GradmedicError, match="unknown activation"):
        depth_scale("swish2", 1.0)


# ---------------------------------------------------------------- predicted_gain vs autograd


def _mlp(act, sigma_w, sigma_b, widths, gen):
    layers = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            lin.weight.normal_(0.0, sigma_w / math.sqrt(fan_in), generator=gen)
            lin.bias.normal_(0.0, sigma_b, generator=gen) if sigma_b else lin.bias.zero_()
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _measured_delta_norms(model, x, gen):
    """||dL/dh_l|| for each Linear output h_l, L = (out * r).sum() with r random."""
    outputs = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: outputs.append(o))
        for m in model
        if isinstance(m, nn.Linear)
    ]
    out = model(x)
    for h in hooks:
        h.remove()
    r = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * r).sum(), outputs)
    return np.array([float(g.norm()) for g in grads])


KEY_CASES = [
    (nn.Tanh, 0.8, 0.0),
    (nn.Tanh, 1.0, 0.0),
    (nn.Tanh, 1.5, 0.0),
    (nn.ReLU, 1.5**0.5, 0.0),
    (nn.ReLU, 2.0**0.5, 0.0),
    (nn.ReLU, 2.5**0.5, 0.0),
    (nn.Sigmoid, 3.0, 0.0),  # E[phi] != 0
    (nn.ELU, 1.3, 0.1),
]


@pytest.mark.parametrize(("act", "sigma_w", "sigma_b"), KEY_CASES)
def test_predicted_gain_matches_autograd(act, sigma_w, sigma_b):
    width, depth, batch = 256, 24, 64
    predicted, measured_log = [], []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        model = _mlp(act, sigma_w, sigma_b, [width] * (depth + 1), gen)
        pred = predicted_gain(model)
        assert pred.covered, pred.reason
        assert len(pred.gains) == depth - 1
        norms = _measured_delta_norms(model, torch.randn(batch, width, generator=gen), gen)
        measured_log.append(math.log(norms[0] / norms[-1]) / (depth - 1))
        predicted.append(pred.geometric_mean_gain)
        assert pred.input_output_ratio == pytest.approx(np.prod(pred.gains))
    measured = math.exp(np.mean(measured_log))
    assert np.mean(predicted) == pytest.approx(measured, rel=0.05)


def test_predicted_gain_follows_finite_depth_not_the_fixed_point():
    # tanh at sigma_w = 1: q decays only like 1/(2l), so early layers gain well below
    # the fixed-point value sqrt(chi) = 1; the prediction must iterate from the input.
    width, depth = 512, 12
    gen = torch.Generator().manual_seed(3)
    model = _mlp(nn.Tanh, 1.0, 0.0, [width] * (depth + 1), gen)
    pred = predicted_gain(model, input_variance=4.0)
    norms = _measured_delta_norms(model, 2.0 * torch.randn(128, width, generator=gen), gen)
    measured = norms[:-1] / norms[1:]
    assert pred.gains[0] < 0.75  # far from sqrt(chi(q*)) = 1
    np.testing.assert_allclose(pred.gains[:4], measured[:4], rtol=0.05)
    rel = pred.relative_delta_norms
    assert rel[pred.layers[-1]] == 1.0
    assert rel[pred.layers[0]] == pytest.approx(norms[0] / norms[-1], rel=0.15)
    # forward: predicted q matches the measured pre-activation variance of layer 1
    assert pred.q[0] == pytest.approx(pred.sigma_w2[0] * 4.0, rel=1e-12)


def test_predicted_gain_mixed_widths_and_composed_activations():
    gen = torch.Generator().manual_seed(5)
    widths = [300, 600, 200, 500, 400, 300]
    model = _mlp(nn.ReLU, 1.6**0.5, 0.1, widths, gen)
    pred = predicted_gain(model)
    assert pred.layers == ("0", "2", "4", "6", "8")
    assert pred.sigma_w2[1] == pytest.approx(
        600 * float(model[2].weight.detach().double().var(unbiased=False))
    )
    assert pred.sigma_b2[1] == pytest.approx(float(model[2].bias.detach().double().pow(2).mean()))
    logs = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        norms = _measured_delta_norms(model, torch.randn(128, 300, generator=g), g)
        logs.append(np.log(norms[:-1] / norms[1:]))
    np.testing.assert_allclose(pred.gains, np.exp(np.mean(logs, axis=0)), rtol=0.05)
    # two activations in a row compose; eval-mode dropout and Flatten are transparent
    seq = nn.Sequential(
        nn.Flatten(), nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 8)
    ).eval()
    p = predicted_gain(seq)
    assert p.activations == ("tanh > relu", "linear")
    h_var = p.q[0]
    expected = p.sigma_w2[1] * _gauss_quad(
        lambda x: ((1 - np.tanh(x) ** 2) * (np.tanh(x) > 0)) ** 2, h_var
    )
    assert p.gains[0] == pytest.approx(math.sqrt(expected), rel=1e-9)


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        x = torch.tanh(self.fc1(x))
        x = torch.nn.functional.leaky_relu(self.fc2(x), negative_slope=0.2)
        return self.fc3(x)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + x


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc2(x)
        return self.fc1(x)


def test_predicted_gain_reads_a_traceable_custom_chain():
    model = _Chain()
    pred = predicted_gain(model)
    assert pred.covered, pred.reason
    assert pred.layers == ("fc1", "fc2", "fc3")
    assert pred.activations == ("tanh", "leaky_relu(slope=0.2)", "linear")
    expected = model.fc2.in_features * float(model.fc2.weight.detach().double().var(unbiased=False))
    d2 = _gauss_quad(lambda x: (1 - np.tanh(x) ** 2) ** 2, pred.q[0])
    assert pred.gains[0] == pytest.approx(math.sqrt(expected * d2), rel=1e-9)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Linear(4, 4)), "convolution"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)), "normalization"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)), "normalization"),
        (nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(), nn.Linear(4, 4)), "unknown module"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)), "model.eval()"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "at least two"),
        (nn.Sequential(nn.Linear(4, 5), nn.Linear(4, 4)), "do not form a chain"),
        (nn.LSTM(4, 4), "recurrent"),
        (_Residual(), "residual"),
        (_Branchy(), "could not trace"),
    ],
)
def test_predicted_gain_not_covered(model, reason):
    pred = predicted_gain(model)
    assert not pred.covered
    assert reason in pred.reason
    assert math.isnan(pred.geometric_mean_gain)
    assert pred.to_dict()["covered"] is False


def test_predicted_gain_rejects_mean_shifted_weights_and_bad_input():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight.uniform_(0.0, 0.1)  # all positive: a coherent mean mode
    pred = predicted_gain(model)
    assert not pred.covered and "mean" in pred.reason
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        predicted_gain("not a model")
    with pytest.raises(ValueError, match="input_variance"):
        predicted_gain(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), input_variance=-1.0)


def test_summarize_and_to_dict():
    s = theory.summarize("relu", 1.2, depth=10)
    assert s.phase == "ordered"
    assert s.gain == pytest.approx(math.sqrt(0.72), rel=1e-12)
    # ReLU from q0 = 1 has chi(q) = sigma_w^2 / 2 at every depth: ratio = 0.72^(10/2)
    assert s.ratio == pytest.approx(0.72**5, rel=1e-10)
    d = s.to_dict()
    assert d["phase"] == "ordered" and d["fixed_point_kind"] == "zero"
    assert "vanish" in s.verdict
    assert theory.summarize("tanh", 1.5).phase == "chaotic"
    with pytest.raises(ValueError, match="depth"):
        theory.summarize("tanh", 1.0, depth=0)
