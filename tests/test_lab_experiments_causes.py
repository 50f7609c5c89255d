"""The CAUSES experiments (K1-K7): their pieces against independent values, and quick runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.lab import plotting, runner
from gradmedic.lab.base import LabConfig, Verdict, judge_claims, odd_keys
from gradmedic.lab.experiments import (
    depth_profiles,
    layer_movement,
    lr_divergence,
    rnn_power,
    sigmoid_chain,
    vanishing_vs_exploding,
)

QUICK = LabConfig(quick=True)

# The quick run's verdicts, pinned (recomputed from the numbers in _run as well).
PINNED = {
    "depth_profiles": Verdict.PARTLY,
    "sigmoid_chain": Verdict.HOLDS,
    "layer_movement": Verdict.PARTLY,
    "rnn_power": Verdict.PARTLY,
    "lr_divergence": Verdict.HOLDS,
    "vanishing_vs_exploding": Verdict.HOLDS,
}


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _run(name):
    result = runner.run([name], QUICK)[0]
    assert result.error is None, result.error
    # the verdict is the standard rule applied to the checks stored in the numbers
    overall, per_claim = judge_claims(result.numbers["checks"])
    assert result.verdict is overall and result.per_claim == per_claim
    assert set(result.claims) == set(result.numbers["checks"])
    assert result.figures and result.rule and result.setup and result.explanation
    for fig in result.figures.values():
        assert plotting.empty_panels(fig) == [], name
    assert result.verdict is PINNED[name], result.explanation
    assert odd_keys(result.numbers) == []
    json.dumps(result.to_dict(), allow_nan=False)
    return result


# --- K1/K2: the sigmoid chain -------------------------------------------------------------


def test_chain_grad_equals_hand_product_formula():
    # Four one-neuron layers, values chosen by hand; the formula evaluated with math only.
    w = [0.7, -1.3, 0.4, 2.1]
    b = [0.2, -0.5, 1.1, -0.3]
    x, t = 0.9, 0.25
    h, zs = x, []
    for wi, bi in zip(w, b, strict=True):
        zs.append(wi * h + bi)
        h = _sig(zs[-1])
    slope = [_sig(z) * (1 - _sig(z)) for z in zs]
    hand = (h - t) * slope[3] * w[3] * slope[2] * w[2] * slope[1] * w[1] * slope[0]
    g = sigmoid_chain.chain_grad(
        torch.tensor([w], dtype=torch.float64),
        torch.tensor([b], dtype=torch.float64),
        torch.tensor([x], dtype=torch.float64),
        torch.tensor([t], dtype=torch.float64),
    )
    assert float(g["autograd"][0]) == pytest.approx(hand, rel=1e-6, abs=0)
    assert float(g["formula"][0]) == pytest.approx(hand, rel=1e-12, abs=0)
    assert float(g["dc_dy"][0]) == pytest.approx(h - t, rel=1e-12)


def test_explosion_window_matches_brute_force():
    for w in (3.0, 4.0, 6.9, 12.0, 30.0):
        xs = np.linspace(-3, 3, 600_001)
        z = w * xs
        s = 1 / (1 + np.exp(-z))
        width = float(np.mean(s * (1 - s) * w > 1) * 6.0)
        assert sigmoid_chain.explosion_width(w) == pytest.approx(width, abs=2e-4)
    assert sigmoid_chain.explosion_width(4.0) == 0.0


def test_sigmoid_chain_quick_run():
    r = _run("sigmoid_chain")
    n = r.numbers
    assert n["max_relative_error_formula_vs_autograd"] < 1e-9
    assert n["max_ratio_over_bound_uniform"] <= 1 + 1e-9
    # the typical factor is below the bound and the per-depth medians follow it
    med = n["median_ratio"]["uniform"]
    assert all(m <= 0.25**d for d, m in zip(n["depths"], med, strict=True))
    # closed-form maximum of 4 arccosh(sqrt(w)/2)/w over w (numerically 0.4477 at w = 6.89)
    assert n["max_explosion_window_width"] == pytest.approx(0.4477, abs=1e-3)


@pytest.mark.parametrize("name", ["sigmoid_chain", "lr_divergence"])
def test_quick_runs_repeat_exactly(name):
    a = runner.run([name], QUICK)[0].to_dict()["numbers"]
    torch.rand(5), np.random.rand(5)  # disturb the global generators in between
    b = runner.run([name], QUICK)[0].to_dict()["numbers"]
    assert a == b


# --- K5: W_h repeated multiplication -------------------------------------------------------


def test_dh_norms_equal_power_of_the_matrix():
    rng = np.random.RandomState(0)
    w = rng.randn(3, 3)
    norms = rnn_power.dh_norms(w, steps=7)
    for t in range(1, 8):
        direct = np.linalg.norm(np.ones((2, 3)) @ np.linalg.matrix_power(w.T, t)) / 2
        assert norms[t - 1] == pytest.approx(direct, rel=1e-12)
    s_max, rho = rnn_power.rates(w)
    assert s_max == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-12)
    assert rho == pytest.approx(max(abs(np.linalg.eigvals(w))), rel=1e-12)
    assert rnn_power.late_rate([1.0, 2.0, 4.0, 8.0], window=2) == pytest.approx(2.0)


def test_rnn_power_quick_run_uses_the_book_matrix():
    r = _run("rnn_power")
    ref = r.numbers["reference"]
    w = np.random.RandomState(3).randn(3, 3)  # the book's np.random.seed(3); randn(H, H)
    dh = np.ones((2, 3))
    for t in range(20):
        dh = dh @ w.T
        assert ref["randn"]["norms"][t] == pytest.approx(np.sqrt(np.sum(dh**2)) / 2, rel=1e-12)
    half = np.linalg.norm(np.ones((2, 3)) @ np.linalg.matrix_power(0.5 * w.T, 20)) / 2
    assert ref["randn_times_half"]["norms"][-1] == pytest.approx(half, rel=1e-12)
    assert ref["randn_times_half"]["sigma_max"] == pytest.approx(0.5 * ref["randn"]["sigma_max"])
    # sigma_max < 1 bounds the norm, so such matrices always decay
    assert r.numbers["sigma_max_below_1_always_decays"] is True
    assert r.numbers["accuracy_spectral_radius_rule"] >= r.numbers["accuracy_sigma_max_rule"]


# --- K1/K3/R2/R4: depth profiles ---------------------------------------------------------


def test_measure_matches_hand_backprop():
    torch.manual_seed(1)
    model = depth_profiles.build("tanh", "xavier", width=5, depth=2)
    torch.manual_seed(2)
    m = depth_profiles.measure(model, batch=3)
    torch.manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64)
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    z1 = x @ w1.T
    z2 = torch.tanh(z1) @ w2.T
    g = torch.randn_like(z2)
    d1 = (1 - torch.tanh(z1) ** 2) * (g @ w2)  # dL/dz1 = phi'(z1) * W2^T g, per example
    rms = lambda d: float(d.pow(2).sum(1).mean().sqrt())  # noqa: E731
    assert m["delta"][1] == pytest.approx(rms(g), rel=1e-12)
    assert m["delta"][0] == pytest.approx(rms(d1), rel=1e-12)


def test_predict_relu_closed_form():
    torch.manual_seed(0)
    model = depth_profiles.build("relu", "he", width=256, depth=6)
    pred = depth_profiles.predict(model)
    # ReLU: E[relu'(z)^2] = 1/2, so each layer multiplies by sqrt(sigma_w^2 / 2) with the
    # sampled sigma_w^2 = fan_in * Var(W) of the layer above.
    s2 = [
        256 * float(m.weight.detach().var(unbiased=False))
        for m in model
        if isinstance(m, nn.Linear)
    ]
    expected = [math.prod(math.sqrt(s / 2) for s in s2[i + 1 :]) for i in range(6)]
    assert pred == pytest.approx(expected, rel=1e-6)


def test_depth_profiles_quick_run():
    r = _run("depth_profiles")
    runs = r.numbers["runs"]
    assert set(runs) == set(depth_profiles.ACTIVATIONS)
    depth = r.numbers["depth"]
    for act in runs.values():
        for one in act.values():
            assert one["measured"][-1] == 1.0 and len(one["measured"]) == depth
            assert one["log10_first_over_last"] == pytest.approx(math.log10(one["measured"][0]))
    # small init: every factor is ~ sigma_w * phi'(0); for sigmoid sigma_w^2 = 0.01^2 * width
    width = r.numbers["width"]
    per_layer = math.log10(0.01 * math.sqrt(width) * 0.25)
    assert runs["sigmoid"]["small"]["log10_first_over_last"] == pytest.approx(
        per_layer * (depth - 1), abs=1.0
    )


# --- K4, K6, K7 --------------------------------------------------------------------------


def test_relative_movement():
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 5.0]])
    assert layer_movement.relative_movement([b], [a]) == [pytest.approx(1 / 5)]


def test_layer_movement_quick_run():
    r = _run("layer_movement")
    deep = r.numbers["deep"]
    assert len(deep["relative_movement"]) == len(deep["sizes"]) - 1 == 7
    assert deep["grad_first_over_last"] == pytest.approx(
        deep["mean_grad_norm"][0] / deep["mean_grad_norm"][-1]
    )
    assert deep["movement_first_over_last"] == pytest.approx(
        deep["relative_movement"][0] / deep["relative_movement"][-1]
    )
    assert 0.0 <= deep["test_accuracy"] <= 1.0


def test_lr_one_run_numbers():
    from gradmedic.lab import data

    ds = data.digits(0).subset(128, 32)
    out = lr_divergence.one_run(ds, "sgd", 0.0, steps=3, seed=0)
    assert out["param_movement"] == 0.0  # lr 0 does not move
    assert out["loss"][0] == out["initial_loss"] and len(out["loss"]) == 3
    big = lr_divergence.one_run(ds, "sgd", 1e3, steps=5, seed=0)
    assert big["param_growth"] > 1


def test_lr_divergence_quick_run():
    r = _run("lr_divergence")
    runs = r.numbers["runs"]
    assert set(runs) == set(lr_divergence.RUNS)
    assert len(r.numbers["seeds"]) == 2  # quick mode; the full run has 3
    for name, (opt, lr) in lr_divergence.RUNS.items():
        assert [(x["optimizer"], x["lr"]) for x in runs[name]] == [(opt, lr)] * 2
    for summary, curves in zip(
        runs[lr_divergence.LARGE], r.numbers["curves"][lr_divergence.LARGE], strict=True
    ):
        assert summary["grad_growth"] == pytest.approx(
            max(curves["grad_norm"]) / curves["grad_norm"][0]
        )


def test_input_output_ratio_and_classify():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 4))
    torch.manual_seed(1)
    ratio = vanishing_vs_exploding.input_output_ratio(model, torch.randn(2, 4))
    torch.manual_seed(1)
    torch.randn(2, 4)
    g = torch.randn(2, 4)
    expected = float((g @ model[2].weight.detach()).norm() / g.norm())
    assert ratio == pytest.approx(expected, rel=1e-6)
    cfg = DiagnosisConfig()
    assert vanishing_vs_exploding.classify(1e-4, cfg) == "vanishing"
    assert vanishing_vs_exploding.classify(1e4, cfg) == "exploding"
    assert vanishing_vs_exploding.classify(math.inf, cfg) == "exploding"
    assert vanishing_vs_exploding.classify(0.5, cfg) == "healthy"


def test_vanishing_vs_exploding_quick_run():
    r = _run("vanishing_vs_exploding")
    counts = r.numbers["counts"]
    assert sum(counts["all"].values()) == 150
    for a, b in (
        ("saturating (sigmoid, tanh)", "ReLU family"),
        ("fan-in scaled init (default, Xavier, He)", "fixed-std init N(0, s^2)"),
    ):
        for k in counts["all"]:
            assert counts[a][k] + counts[b][k] == counts["all"][k]
    agreement = r.numbers["gradmedic_check_agreement"]
    assert 0 <= agreement["agree"] <= agreement["checked"]
    assert r.verdict in (Verdict.HOLDS, Verdict.PARTLY, Verdict.FAILS)
