"""The pure parts of the repair search: appliers, settings, ranking, snippet, truncation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradmedic.autorepair import appliers
from gradmedic.autorepair.problem import Budget, Metric, Setup, as_metric, train_batches
from gradmedic.autorepair.search import _fused
from gradmedic.autorepair.snippet import snippet
from gradmedic.autorepair.train import make_optimizer
from gradmedic.autorepair.truncate import truncated_bptt
from gradmedic.errors import GradmedicError
from gradmedic.findings import Finding, Problem, Severity
from gradmedic.remedies import catalog


def _data(n=32):
    x = torch.randn(n, 4)
    return (x, x.sum(1, keepdim=True)), (x, x.sum(1, keepdim=True))


# ---- appliers --------------------------------------------------------------------


def test_every_catalog_remedy_has_an_applier():
    rnn_model = nn.Sequential(nn.RNN(2, 3), nn.Sigmoid(), nn.Tanh(), nn.ReLU())
    pool = appliers.whole_catalog(rnn_model)
    names = {r.name for r in pool}
    # every constructor of the catalog is represented (forget_bias needs an LSTM)
    assert {
        "he_init",
        "lsuv_init",
        "swap_relu",
        "swap_elu",
        "batch_norm",
        "layer_norm",
        "residual",
        "clip_norm",
        "clip_value",
        "autoclip",
        "lower_lr",
        "adaptive_optimizer",
        "weight_decay",
        "gate_lstm",
        "gate_gru",
        "bias_reinit",
        "truncate_bptt",
    } <= names
    assert "forget_bias" not in names
    lstm = nn.Sequential(nn.LSTM(2, 3))
    lstm_names = {r.name for r in appliers.whole_catalog(lstm)}
    assert "forget_bias" in lstm_names and "gate_lstm" not in lstm_names
    assert "truncate_bptt" in lstm_names
    mlp = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid())
    mlp_names = {r.name for r in appliers.whole_catalog(mlp)}
    assert not mlp_names & {"gate_lstm", "gate_gru", "truncate_bptt", "forget_bias"}
    # Sigmoid -> three replacements; no swap to the same class
    assert {r.name for r in appliers.whole_catalog(mlp) if r.name.startswith("swap_")} == {
        "swap_relu",
        "swap_leakyrelu",
        "swap_elu",
    }


def test_unknown_remedy_is_a_clear_error():
    with pytest.raises(GradmedicError, match="no repair applier for remedy 'frobnicate'"):
        appliers.applier_for("frobnicate")


def test_order_puts_structure_before_init_before_training():
    remedies = [
        catalog.clip_norm(1.0),
        catalog.init_scheme("he"),
        catalog.swap_activation("Sigmoid", "ReLU"),
        catalog.lower_lr(0.1),
    ]
    assert [r.name for r in appliers.order(remedies)] == [
        "swap_relu",
        "he_init",
        "lower_lr",
        "clip_norm",
    ]


def test_compatible_excludes_two_of_one_group():
    assert appliers.compatible([catalog.init_scheme("he"), catalog.clip_norm(1.0)])
    assert not appliers.compatible([catalog.init_scheme("he"), catalog.init_scheme("xavier")])
    assert not appliers.compatible([catalog.clip_norm(1.0), catalog.autoclip(10.0)])
    assert not appliers.compatible([catalog.normalization("batch"), catalog.normalization("layer")])


def test_settings_from_training_remedies():
    s = appliers.settings_for(
        [
            catalog.clip_norm(2.5),
            catalog.lower_lr(0.1),
            catalog.weight_decay(1e-3),
            catalog.truncate_bptt(7),
        ]
    )
    assert s.clip_norm == 2.5 and s.clip_value is None and s.autoclip is None
    assert s.lr_factor == pytest.approx(0.1)
    assert s.weight_decay == pytest.approx(1e-3)
    assert s.truncate_bptt == 7
    assert s.adam_lr is None
    s = appliers.settings_for(
        [catalog.adaptive_optimizer(), catalog.autoclip(5.0), catalog.init_scheme("he")]
    )
    assert s.adam_lr == pytest.approx(1e-3) and s.autoclip == 5.0 and s.lr_factor == 1.0


def test_make_optimizer_scales_lr_and_switches_to_adam():
    model = nn.Linear(4, 1)
    setup = Setup(
        lambda: model,
        _data(),
        nn.MSELoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    )
    opt = make_optimizer(setup, model, appliers.settings_for([catalog.lower_lr(0.1)]))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["momentum"] == 0.9
    opt = make_optimizer(setup, model, appliers.settings_for([catalog.adaptive_optimizer()]))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    opt = make_optimizer(setup, model, appliers.TrainSettings())
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5


# ---- ranking -----------------------------------------------------------------------


def _finding(problem, severity, remedies):
    return Finding(problem, severity, ["0"], {}, "x", remedies)


def test_fused_ranking_by_severity_weighted_reciprocal_rank():
    he, bn, relu = (
        catalog.init_scheme("he"),
        catalog.normalization("batch"),
        catalog.swap_activation("Sigmoid", "ReLU"),
    )
    clip = catalog.clip_norm(1.0)
    findings = [
        # critical (weight 3): relu 3/1, he 3/2, bn 3/3
        _finding(Problem.VANISHING, Severity.CRITICAL, [relu, he, bn]),
        # warning (weight 2): bn 2/1, clip 2/2
        _finding(Problem.SATURATION, Severity.WARNING, [bn, clip]),
    ]
    # scores: relu 3, bn 1 + 2 = 3, he 1.5, clip 1 -> ties keep first appearance
    assert [r.name for r in _fused(findings)] == ["swap_relu", "batch_norm", "he_init", "clip_norm"]


def test_fused_ranking_skips_unknown_remedies():
    from gradmedic.findings import Remedy

    odd = Remedy("pretrain", "layer-wise pretraining", "pretrain(model)")
    findings = [_finding(Problem.VANISHING, Severity.INFO, [odd, catalog.residual()])]
    assert [r.name for r in _fused(findings)] == ["residual"]


# ---- setup, metric, data ------------------------------------------------------------


def test_setup_validation_names_the_argument():
    with pytest.raises(ValueError, match="data must be a pair"):
        Setup(lambda: nn.Linear(4, 1), (1, 2, 3), nn.MSELoss())
    with pytest.raises(ValueError, match="train inputs and targets differ"):
        Setup(
            lambda: nn.Linear(4, 1), ((torch.zeros(3, 4), torch.zeros(2)), _data()[1]), nn.MSELoss()
        )
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        Setup(lambda: nn.Linear(4, 1), _data(), "mse")
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        Setup(
            lambda: nn.Linear(4, 1),
            _data(),
            nn.MSELoss(),
            optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
        )
    with pytest.raises(ValueError, match="metric must be"):
        Setup(lambda: nn.Linear(4, 1), _data(), nn.MSELoss(), metric="f1")
    with pytest.raises(ValueError, match=r"Budget\.steps"):
        Budget(steps=0)
    with pytest.raises(GradmedicError, match=r"must return a torch\.nn\.Module"):
        Setup(lambda: 3, _data(), nn.MSELoss()).fresh_model()


def test_setup_from_dict():
    s = Setup.from_any({"model": nn.Linear(4, 1), "data": _data(), "loss_fn": nn.MSELoss()})
    assert isinstance(s.fresh_model(), nn.Linear)
    with pytest.raises(ValueError, match="unknown setup key"):
        Setup.from_any(
            {"model": nn.Linear(4, 1), "data": _data(), "loss_fn": nn.MSELoss(), "lr": 3}
        )
    with pytest.raises(ValueError, match="lacks"):
        Setup.from_any({"data": _data(), "loss_fn": nn.MSELoss()})


def test_model_instance_is_copied_not_shared():
    model = nn.Linear(4, 1)
    s = Setup(model, _data(), nn.MSELoss())
    copy = s.fresh_model()
    assert copy is not model and copy.weight is not model.weight
    assert torch.equal(copy.weight, model.weight)


def test_metrics():
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    y = torch.tensor([1, 1, 1])
    acc = as_metric("accuracy", None)
    assert acc.fn(out, y) == pytest.approx(2 / 3) and acc.higher_is_better
    mse = as_metric(None, nn.MSELoss())
    assert not mse.higher_is_better
    assert mse.fn(torch.ones(3), torch.zeros(3)) == pytest.approx(1.0)
    assert mse.score(2.0) == -2.0 and mse.score(math.nan) == -math.inf
    custom = Metric("neg", lambda o, t: 1.0, higher_is_better=False)
    assert as_metric(custom, None) is custom


def test_train_batches_are_seeded_epochs():
    x = torch.arange(10.0).unsqueeze(1)
    part = (x, x.squeeze(1))
    a = [next(it)[1] for it in [train_batches(part, 4, torch.Generator().manual_seed(3))] * 6]
    b = [next(it)[1] for it in [train_batches(part, 4, torch.Generator().manual_seed(3))] * 6]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # one epoch = batches of 4, 4, 2 covering every sample once
    assert [len(t) for t in a[:3]] == [4, 4, 2]
    assert sorted(torch.cat(a[:3]).tolist()) == list(range(10))


# ---- truncated BPTT ---------------------------------------------------------------


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_truncated_bptt_cuts_the_gradient_and_keeps_the_forward(cls):
    rnn = cls(2, 3, batch_first=True)
    x = torch.randn(2, 10, 2, requires_grad=True)
    full, _ = rnn(x)
    (g_full,) = torch.autograd.grad(full[:, -1].sum(), x)
    with truncated_bptt(rnn, 4):
        cut, _ = rnn(x)
    (g_cut,) = torch.autograd.grad(cut[:, -1].sum(), x)
    torch.testing.assert_close(cut, full)
    # chunks [0:4] [4:8] [8:10]: only the last chunk reaches the last output
    assert torch.count_nonzero(g_cut[:, :8]) == 0
    assert torch.count_nonzero(g_full[:, :8]) > 0
    torch.testing.assert_close(g_cut[:, 8:], g_full[:, 8:])
    assert "forward" not in vars(rnn)  # restored


# ---- snippet ----------------------------------------------------------------------


def test_snippet_places_each_change():
    text = snippet(
        [
            catalog.clip_norm(1.0),
            catalog.swap_activation("Sigmoid", "ReLU"),
            catalog.init_scheme("he"),
            catalog.autoclip(10.0),
            catalog.lower_lr(0.1),
        ]
    )
    assert text == (
        "import gradmedic\nfrom torch import nn\n\n"
        "# after building the model (before creating the optimizer):\n"
        "model = gradmedic.surgery.swap_activations(model, {nn.Sigmoid: nn.ReLU})\n"
        "gradmedic.init.apply(model, 'he')\n\n"
        "# the optimizer (create it after the model changes above):\n"
        "for g in optimizer.param_groups: g['lr'] *= 0.1\n"
        "clipper = gradmedic.AutoClip(percentile=10)\n\n"
        "# in the training loop, between loss.backward() and optimizer.step():\n"
        "gradmedic.clip_grad_norm_(model.parameters(), max_norm=1)\n"
        "clipper(model.parameters())"
    )
    assert snippet([]) == "# no repair needed"


def test_snippet_optimizer_lines_run():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    text = snippet([catalog.lower_lr(0.5)])
    code = text.split("\n\n", 1)[1]
    exec(code, {"optimizer": optimizer, "model": model})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# ---- the training harness against a plain PyTorch loop -----------------------------


def _plain_loop(setup, steps, make_opt, clip=None):
    batches = train_batches(setup.data[0], setup.batch_size, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = setup.fresh_model()
    opt = make_opt(model)
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        setup.loss_fn(model(x), y).backward()
        if clip is not None:
            clip(model.parameters())
        opt.step()
    return model


def _sgd_decay(model):
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    return torch.optim.SGD(
        [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
        lr=0.1,
    )


@pytest.mark.parametrize(
    ("remedies", "make_opt", "clip"),
    [
        ([], lambda m: torch.optim.SGD(m.parameters(), lr=0.1), None),
        (
            [catalog.clip_norm(0.05)],
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            lambda p: torch.nn.utils.clip_grad_norm_(p, 0.05),
        ),
        (
            [catalog.clip_value(0.01)],
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            lambda p: torch.nn.utils.clip_grad_value_(p, 0.01),
        ),
        ([catalog.lower_lr(0.1)], lambda m: torch.optim.SGD(m.parameters(), lr=0.01), None),
        ([catalog.adaptive_optimizer()], lambda m: torch.optim.Adam(m.parameters(), 1e-3), None),
        ([catalog.weight_decay(0.1)], _sgd_decay, None),
    ],
    ids=["none", "clip_norm", "clip_value", "lower_lr", "adam", "weight_decay"],
)
def test_training_harness_matches_a_plain_pytorch_loop(remedies, make_opt, clip):
    from gradmedic.autorepair import train

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    setup = Setup(
        lambda: nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)),
        ((x, y), (x, y)),
        nn.MSELoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=16,
    )
    out = train(setup, remedies, budget=Budget(steps=12), seed=0)
    expected = _plain_loop(setup, 12, make_opt, clip)
    assert out.steps == 12 and not out.diverged and len(out.losses) == 12
    for a, b in zip(out.model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert out.val_loss == pytest.approx(float(nn.MSELoss()(expected(x), y)), rel=1e-5)


def test_model_appliers_change_a_copy_through_surgery_and_init():
    from gradmedic.autorepair.examples import AddingRNN, mlp

    torch.manual_seed(0)
    model = mlp(nn.Sigmoid, depth=2, width=32)
    remedies = [
        catalog.normalization("batch"),
        catalog.swap_activation("Sigmoid", "ReLU"),
        catalog.init_scheme("he"),
    ]
    out = appliers.apply_model(model, remedies, torch.randn(16, 64))
    kinds = [type(m).__name__ for m in out]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in model].count("Sigmoid") == 2  # the input is untouched
    # He: Var(w) = 2 / fan_in for the 64 -> 32 layer (2048 samples: +-10%)
    assert out[0].weight.var().item() == pytest.approx(2 / 64, rel=0.1)

    rnn = AddingRNN(hidden=8)
    gated = appliers.apply_model(
        rnn, [catalog.forget_bias(1.0), catalog.gate_recurrent("lstm")], torch.randn(2, 5, 2)
    )
    (lstm,) = [m for m in gated.modules() if isinstance(m, nn.LSTM)]
    assert isinstance(rnn.rnn, nn.RNN)
    forget = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[8:16]
    torch.testing.assert_close(forget, torch.ones(8))
