"""The remedy experiments (R1-R10): each runs in quick mode, is well formed, and its key
numbers agree with an independent computation."""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from gradmedic.lab import data, plotting
from gradmedic.lab.base import (
    EXPERIMENTS,
    LabConfig,
    Result,
    Verdict,
    judge,
    judge_claims,
    odd_keys,
)
from gradmedic.lab.claims import CLAIMS
from gradmedic.lab.experiments import (
    _nets,
    batchnorm_elu_he,
    clip_value_relu,
    clipping_exploding,
    dead_relu,
    init_schemes,
    pretraining,
    recurrent_adding,
    relu_family,
    relu_sparsity,
    residual_vs_plain,
    weight_decay,
)

MODULES = {
    m.NAME: m
    for m in (
        residual_vs_plain,
        relu_family,
        dead_relu,
        relu_sparsity,
        init_schemes,
        weight_decay,
        batchnorm_elu_he,
        clip_value_relu,
        clipping_exploding,
        recurrent_adding,
        pretraining,
    )
}
QUICK = LabConfig(quick=True, seed=0)

# The quick run's verdicts, pinned: a change of verdict must be a decision, not a side effect.
# (Each is still recomputed from the run's numbers in test_verdict_is_computed_from_the_checks.)
PINNED = {
    "residual_vs_plain": Verdict.PARTLY,
    "relu_family": Verdict.PARTLY,
    "dead_relu": Verdict.PARTLY,
    "relu_sparsity": Verdict.PARTLY,
    "init_schemes": Verdict.HOLDS,
    "weight_decay": Verdict.PARTLY,
    "batchnorm_elu_he": Verdict.PARTLY,
    "clip_value_relu": Verdict.PARTLY,
    "clipping_exploding": Verdict.HOLDS,
    "recurrent_adding": Verdict.PARTLY,
    "pretraining": Verdict.HOLDS,
}


@functools.cache
def quick(name: str) -> Result:
    torch.manual_seed(123)  # the experiments must seed themselves: this must not matter
    return MODULES[name].run(QUICK)


# ---------------------------------------------------------------- every experiment


@pytest.mark.parametrize("name", sorted(MODULES))
def test_registered_and_well_formed(name):
    assert name in EXPERIMENTS
    r = quick(name)
    assert isinstance(r, Result)
    assert r.name == name
    assert r.claims and set(r.claims) <= set(CLAIMS)
    assert all(s.strip() for s in (r.title, r.setup, r.expected, r.rule, r.explanation))
    assert isinstance(r.verdict, Verdict) and r.verdict != Verdict.ERROR
    assert r.figures and all(isinstance(f, Figure) for f in r.figures.values())
    for fig in r.figures.values():
        assert plotting.empty_panels(fig) == []
        assert plotting.to_svg(fig).lstrip().startswith("<?xml")
    json.dumps(r.to_dict(), allow_nan=False)  # plain data only, every number finite or null
    assert odd_keys(r.numbers) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_quick_verdict_is_pinned(name):
    assert quick(name).verdict is PINNED[name], quick(name).explanation


@pytest.mark.parametrize("name", sorted(MODULES))
def test_verdict_is_computed_from_the_checks(name):
    r = quick(name)
    checks = r.numbers["checks"]
    if len(r.claims) > 1:
        verdict, per_claim = judge_claims(checks)
    else:
        verdict, per_claim = judge(checks), {}
    if r.numbers.get("learned") is False:  # a precondition failed: nothing to judge
        verdict = Verdict.INCONCLUSIVE
        per_claim = {c: Verdict.INCONCLUSIVE for c in per_claim}
    assert verdict == r.verdict
    if len(r.claims) > 1:
        assert per_claim == r.per_claim
    assert all(isinstance(v, bool) for v in _leaves(checks))


def _leaves(d):
    for v in d.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]


def test_two_runs_give_identical_numbers():
    a = clipping_exploding.run(QUICK).to_dict()
    torch.manual_seed(999)
    b = clipping_exploding.run(QUICK).to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------- R1 / R6 depth 50


def test_residual_net_is_the_plain_net_with_skips():
    torch.manual_seed(0)
    plain = residual_vs_plain.build("plain", 8, 6, seed=0)
    res = residual_vs_plain.build("residual", 8, 6, seed=0)
    x = torch.randn(5, 64)
    lin = [m for m in plain if isinstance(m, nn.Linear)]
    h = torch.tanh(lin[0](x))
    for m in lin[1:-1]:
        h = h + torch.tanh(m(h))  # x + F(x) by hand, with the plain net's weights
    torch.testing.assert_close(res(x), lin[-1](h))


def test_step0_gradient_ratio_matches_autograd_on_the_first_batch():
    r = quick("residual_vs_plain")
    ds = data.digits(0)
    batch = 64  # the quick batch size
    assert r.numbers["seeds"] == [0, 1000]  # quick mode: two seeds, the full run three
    for k, seed in enumerate(r.numbers["seeds"]):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds.x_train), generator=gen)[:batch]
        for kind in ("plain", "residual"):
            model = residual_vs_plain.build(kind, r.numbers["width"], 50, seed=seed)
            nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
            norms = [math.hypot(m.weight.grad.norm(), m.bias.grad.norm()) for m in lin]
            measured = r.numbers["first_over_last"][kind]["values"][k]
            assert measured == pytest.approx(norms[0] / norms[-1], rel=1e-4)
    assert r.numbers["first_over_last"]["plain"]["mean"] < 1e-6  # vanishing, as theory says
    # the loss comparison is the paired rule recomputed by hand from the per-seed losses
    plain, res = (r.numbers["final_loss"][k]["values"] for k in ("plain", "residual"))
    d = [a - b for a, b in zip(plain, res, strict=True)]
    half = 2 * statistics.stdev(d) / math.sqrt(len(d))
    cmp = r.numbers["comparisons"]["plain_minus_residual"]
    assert cmp["diff"] == pytest.approx(statistics.fmean(d))
    assert cmp["half_width"] == pytest.approx(half)
    m, bar = statistics.fmean(d), max(half, residual_vs_plain.MARGIN)
    assert cmp["outcome"] == ("a > b" if m > bar else "a < b" if m < -bar else "tie")
    gain = r.numbers["plain_gain_per_layer"]
    assert gain["measured"] == pytest.approx(gain["mean_field"], rel=0.1)


# ---------------------------------------------------------------- R2 slopes


def test_slopes_match_closed_form_derivatives():
    torch.manual_seed(0)
    x = torch.randn(20, 64)
    closed = {
        "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
        "tanh": lambda z: 1 - torch.tanh(z) ** 2,
        "relu": lambda z: (z > 0).float(),
        "leaky_relu": lambda z: torch.where(z > 0, 1.0, 0.01),
        "elu": lambda z: torch.where(z > 0, 1.0, torch.exp(z)),
    }
    for act, deriv in closed.items():
        model = _nets.mlp([64, 16, 16, 10], relu_family.ACTS[act])
        z, d = relu_family.slopes(model, x)
        torch.testing.assert_close(d, deriv(z))
    r = quick("relu_family")
    assert r.numbers["mean_slope"]["sigmoid"] <= 0.25


# ---------------------------------------------------------------- R3 dead units


def test_killed_units_are_dead_on_every_input_and_get_zero_relu_gradient():
    ds = data.digits(0)
    x, y = ds.x_train, ds.y_train
    for act in ("relu", "leaky_relu"):
        model = dead_relu.killed_net(act, x, seed=0)
        z = model[0](x)
        top = z.max(dim=0).values
        torch.testing.assert_close(top[: dead_relu.KILLED], torch.full((dead_relu.KILLED,), -0.5))
        assert (top[dead_relu.KILLED :] > 0).any()
        nn.functional.cross_entropy(model(x[:50]), y[:50]).backward()
        g = model[0].weight.grad[: dead_relu.KILLED]
        if act == "relu":
            assert torch.count_nonzero(g) == 0
        else:  # by hand: dL/dW1[j] = mean_n (softmax - onehot) W2[:, j] * slope * x_n
            with torch.no_grad():
                err = torch.softmax(model(x[:50]), 1) - nn.functional.one_hot(y[:50], 10)
                upstream = err @ model[2].weight[:, : dead_relu.KILLED] * dead_relu.SLOPE
                expected = upstream.T @ x[:50] / 50
            torch.testing.assert_close(g, expected)


def test_dead_relu_numbers():
    n = quick("dead_relu").numbers
    assert n["first_grad_max_killed"]["relu_sgd"] == [0.0] * len(n["seeds"])
    assert n["revived"]["relu_sgd"]["values"] == n["revived"]["relu_adam"]["values"] == [0, 0]
    assert min(n["first_grad_max_killed"]["leaky_relu_sgd"]) > 0


# ---------------------------------------------------------------- R3 2^N claim


def test_path_share_matches_enumeration_of_paths():
    torch.manual_seed(0)
    model = _nets.mlp([4, 3, 3, 3, 2], nn.ReLU)
    x = torch.randn(6, 4)
    got = relu_sparsity.rates(model, x)
    acts, h = [], x
    for m in model:
        h = m(h)
        if isinstance(m, nn.ReLU):
            acts.append((h > 0).detach().numpy())
    for depth in range(1, 4):
        per_input = []
        for a in range(len(x)):
            paths = list(itertools.product(range(3), repeat=depth))
            active = sum(all(acts[k][a, u] for k, u in enumerate(p)) for p in paths)
            per_input.append(active / len(paths))
        assert got["path"][depth - 1] == pytest.approx(np.mean(per_input))
        assert got["unit"][depth - 1] == pytest.approx(acts[depth - 1].mean())


def test_unit_rate_does_not_halve_per_layer():
    n = quick("relu_sparsity").numbers
    assert abs(n["per_layer_factor"]["init"]["unit"] - 1) < 0.1  # stays ~constant
    assert abs(n["per_layer_factor"]["init"]["path"] - 0.5) < 0.1  # paths halve


# ---------------------------------------------------------------- R4 init


def test_init_schemes_build_the_stated_weights():
    torch.manual_seed(0)
    for init, std in init_schemes.STD.items():
        w = init_schemes.build("relu", init, [64, 256, 256, 10])[2].weight
        assert float(w.detach().std()) == pytest.approx(std, rel=0.02)
    w = init_schemes.build("relu", "he", [64, 256, 256, 10])[2].weight
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.02)
    n = quick("init_schemes").numbers
    assert n["first_over_last"]["relu"]["small"]["mean"] < 1e-6
    assert len(n["first_over_last"]["relu"]["small"]["values"]) == len(n["seeds"]) == 2


# ---------------------------------------------------------------- R5 weight decay


def test_spectral_norms_match_numpy_svd():
    torch.manual_seed(0)
    model = _nets.mlp([5, 7, 3], nn.ReLU)
    expected = [np.linalg.svd(m.weight.detach().numpy(), compute_uv=False)[0] for m in model[::2]]
    assert weight_decay.spectral_norms(model) == pytest.approx(expected, rel=1e-5)
    n = quick("weight_decay").numbers
    prod = n["log10_product_spectral_norms"]["decay_0"]
    for r, value in zip(n["runs"]["decay_0"], prod["values"], strict=True):
        assert value == pytest.approx(sum(math.log10(s) for s in r["spectral_norms"]))
    assert prod["mean"] == pytest.approx(np.mean(prod["values"]))
    assert prod["std"] == pytest.approx(np.std(prod["values"], ddof=1))


# ---------------------------------------------------------------- R6 source 004 batch norm


def test_batchnorm_momentum_is_tensorflow_0_9():
    torch.manual_seed(0)
    model = batchnorm_elu_he.build(64, 10, norm=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ELU",
        "Linear",
        "BatchNorm1d",
        "ELU",
        "Linear",
        "BatchNorm1d",
    ]
    x = torch.randn(200, 64)
    bn = model[1]
    model(x)
    batch_mean = model[0](x).mean(0).detach()
    torch.testing.assert_close(bn.running_mean, 0.9 * torch.zeros(300) + 0.1 * batch_mean)


def test_seed_004_batchnorm_reads_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)

    def write(name, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (tmp_path / name).write_bytes(header + arr.astype(np.uint8).tobytes())

    write("train-images-idx3-ubyte", rng.integers(0, 256, (400, 28, 28)))
    write("train-labels-idx1-ubyte", np.arange(400) % 10)
    write("t10k-images-idx3-ubyte", rng.integers(0, 256, (50, 28, 28)))
    write("t10k-labels-idx1-ubyte", np.arange(50) % 10)
    r = batchnorm_elu_he.run(LabConfig(quick=True, seed=0, mnist_dir=str(tmp_path)))
    assert r.numbers["dataset"] == "mnist" and len(r.numbers["seeds"]) == 3
    assert r.numbers["steps"] == 5 * (400 // 200)
    assert "784-300-100-10" in r.setup


# ---------------------------------------------------------------- R7 clipping


def test_norm_clipping_gives_min_of_norm_and_threshold():
    n = quick("clipping_exploding").numbers
    t = n["threshold"]
    for norm in n["runs"]["norm"]:  # one run per seed
        before = np.array(norm["grad_norm_before_clip"])
        after = np.array(norm["grad_norm_after_clip"])
        np.testing.assert_allclose(after, np.minimum(before, t), rtol=1e-4)
    assert n["first_grad_norm"]["mean"] > 10 * t  # there was something to clip
    assert n["diverged"]["none"] == [
        not all(math.isfinite(v) for v in r["loss"]) for r in n["runs"]["none"]
    ]
    assert n["max_element_after_clip"] <= t


def test_seed_004_clip_value_recipe():
    r = quick("clip_value_relu")
    n = r.numbers
    assert n["largest_element_after_clipping"] <= 1.0
    for clipped, unclipped, above in zip(
        n["runs"]["clipped"],
        n["runs"]["unclipped"],
        n["steps_with_elements_above_threshold"]["unclipped"],
        strict=True,
    ):
        if above == 0:  # clipping was the identity
            assert clipped["loss"] == unclipped["loss"]
    # the shortcut "nothing exceeded the threshold, so the clipped run is the unclipped
    # run" is checked against a real clipped run of the first seed
    if n["steps_with_elements_above_threshold"]["unclipped"][0] == 0:
        ds = data.load(QUICK.seed, None)
        real = clip_value_relu.clip_run(True, ds, n["steps"], n["steps"] // 10, n["seeds"][0])
        assert real["loss"] == n["runs"]["unclipped"][0]["loss"]
        assert real["test_accuracy"] == n["runs"]["unclipped"][0]["test_accuracy"]
    # the precondition: "does not hurt" is judged only on nets that learned
    accs = n["final_accuracy"]["unclipped"]["values"]
    assert n["learned"] == (min(accs) >= clip_value_relu.LEARNED)
    assert (r.verdict is Verdict.INCONCLUSIVE) == (not n["learned"])


# ---------------------------------------------------------------- R8 / R9 recurrent


def test_adding_problem_data_and_mean_baseline():
    x, y = recurrent_adding.adding(10, 2000, seed=0)
    marks = x[..., 1].numpy()
    assert (marks.sum(1) == 2).all()
    assert (marks[:, :5].sum(1) == 1).all() and (marks[:, 5:].sum(1) == 1).all()
    values = x[..., 0].numpy()
    np.testing.assert_allclose(y[:, 0].numpy(), (values * marks).sum(1), rtol=1e-6)
    n = quick("recurrent_adding").numbers
    # Var(u1 + u2) = 2 * 1/12; 1000 test sequences: standard error ~0.005
    assert n["baseline_mse"] == pytest.approx(1 / 6, abs=0.02)
    f1 = n["runs"]["lstm_forget1"]["gate_mean_init"]
    assert f1 > n["runs"]["lstm"]["gate_mean_init"] + 0.1  # the forget bias 1 opened the gate


def test_gradient_over_time_matches_a_hand_unrolled_gru():
    x, y = recurrent_adding.adding(6, 100, seed=0)
    _, _, (rec,) = recurrent_adding.train_reader("gru", x, y, hidden=4, steps=1, lr=0.01, seed=3)
    torch.manual_seed(3)
    model = recurrent_adding.Reader("gru", 4)  # the same initial weights
    idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(3))
    cell = nn.GRUCell(2, 4)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(model.rnn, f"{name}_l0"))
    h = torch.zeros(64, 4)
    hs = []
    for t in range(6):
        h = cell(x[idx, t], h)
        h.retain_grad()
        hs.append(h)
    nn.functional.mse_loss(model.head(h), y[idx]).backward()
    n = rec.get("batch", 64)  # the probe may recompute on the batch's first n sequences
    assert 1 <= n <= 64
    expected = [float(v.grad[:n].norm()) for v in hs]
    assert rec["dh_norm"] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- R10 pre-training


def test_pretraining_learns_to_reconstruct_without_labels():
    torch.manual_seed(0)
    ds = data.digits(0)
    model = _nets.mlp([64, 16, 16, 10], nn.Sigmoid)
    out_before = model[-1].weight.clone()
    errors = pretraining.pretrain(model, ds.x_train, steps=150, seed=0)
    mean_guess = float(ds.x_train.var(0, unbiased=False).mean())  # MSE of predicting the mean
    assert errors[0] < 0.7 * mean_guess
    assert torch.equal(model[-1].weight, out_before)  # the output layer is left alone
    n = quick("pretraining").numbers
    assert [len(e) for e in n["reconstruction_error"]] == [n["depth"]] * len(n["seeds"])
