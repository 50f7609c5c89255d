"""check() end to end, and the healthy/broken suite of tests/cases.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmedic
from cases import PREFLIGHT, TRAINING, NanMaker, he, mlp, nan_in_middle, normal
from gradmedic.context import model_context
from gradmedic.findings import Problem


@pytest.mark.parametrize("case", PREFLIGHT, ids=lambda c: c.name)
def test_suite_preflight(case):
    model, x, y = case.build()
    d = gradmedic.check(model, x, y)
    assert d.problems == set(case.expected), [f.explanation for f in d.findings]


def sigmoid20() -> nn.Sequential:
    return mlp([64] + [64] * 19 + [10], nn.Sigmoid)


def test_deep_sigmoid_vanishes_naming_input_side_layers():
    model = sigmoid20()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    d = gradmedic.check(model, x, y)
    f = d.by_problem(Problem.VANISHING)[0]
    assert f.step is None  # a preflight
    assert "0" in f.layers and "38" not in f.layers
    # independent: the delta of the first layer's output, by autograd
    h = model[0](x)
    h.retain_grad()
    out = model[1:](h)
    nn.functional.cross_entropy(out, y).backward()
    h_last = model[:-1](x).detach().requires_grad_(True)
    nn.functional.cross_entropy(model[-1](h_last), y).backward()
    ratio = float(h.grad.norm() / h_last.grad.norm())
    assert f.evidence["input_output_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert ratio < 1e-12
    assert f.evidence["activation"] == "Sigmoid"
    assert f.evidence["weight_scale"] == pytest.approx(1 / math.sqrt(3), rel=0.05)  # default init


def test_deep_sigmoid_vanishes_from_the_first_monitor_record():
    model = sigmoid20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        loss = nn.functional.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
        loss.backward()
        opt.step()
        d = mon.diagnose()
    assert len(mon.history) == 1
    f = d.by_problem("vanishing")[0]
    assert f.step == 0 and "0" in f.layers


def test_relu_with_unit_normal_weights_explodes_although_weight_gradients_are_balanced():
    torch.manual_seed(0)
    model = mlp([256] * 8 + [10], nn.ReLU, normal(1.0))
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    d = gradmedic.check(model, x, y)
    assert d.problems == {Problem.EXPLODING}
    f = d.findings[0]
    assert f.evidence["per_layer_gain"] == pytest.approx(math.sqrt(256 / 2), rel=0.3)
    assert f.evidence["total_gain"] > 1e6
    # independent: weight-gradient norms from autograd stay within a factor 10 of each other
    nn.functional.cross_entropy(model(x), y).backward()
    norms = [float(m.weight.grad.norm()) for m in model if isinstance(m, nn.Linear)]
    assert max(norms) / min(norms) < 10
    assert d.profile["grad_norm"]["0"] == pytest.approx(
        math.hypot(norms[0], float(model[0].bias.grad.norm())), rel=1e-4
    )


def test_nan_in_the_middle_names_the_module_that_made_it():
    model, x, y = nan_in_middle(), torch.randn(8, 16), torch.randint(0, 4, (8,))
    assert isinstance(model[3], NanMaker)
    d = gradmedic.check(model, x, y)
    assert d.problems == {Problem.NONFINITE}
    f = d.findings[0]
    assert f.evidence["suspects"] == ["3"]
    assert list(f.layers) == ["3", "4"]  # the maker, then the layer the monitor saw it at
    assert f.evidence["where"] == "forward"


def test_nan_origin_from_the_monitor_rows_and_forward_order():
    model = nan_in_middle()
    with gradmedic.watch(model) as mon:
        loss = model(torch.randn(8, 16)).sum()
        loss.backward()
        mon.step(loss)
        rows, layers = mon.history.rows(), mon.layers
    assert rows[0]["nonfinite_origin"]["layer"] == "4"
    order = [n for n, _ in model.named_modules() if n]
    d = gradmedic.diagnose_rows(rows, layers=layers, context=model_context(model, layers, order))
    assert d.by_problem("nonfinite")[0].evidence["suspects"] == ["3"]


def test_check_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(16, 3))  # fmt: skip
    model.eval()
    model[3].train()  # mixed modes survive
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before_grad = model[0].weight.grad
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    rng = torch.get_rng_state()
    gradmedic.check(model, x, y)
    assert model[0].weight.grad is before_grad and torch.equal(before_grad, torch.ones(16, 8))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert [m.training for m in model] == [False, False, False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_default_losses():
    torch.manual_seed(0)
    model = mlp([8, 16, 4], nn.ReLU, he)
    x = torch.randn(5, 8)
    out = model(x).detach()
    d = gradmedic.check(model, x)  # no targets: (out * r).sum() / batch, r ~ N(0, 1) fixed
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    assert d.context["loss"] == pytest.approx(float((out * r).sum() / 5), rel=1e-5)
    t = torch.randn(5, 4)
    d = gradmedic.check(model, x, t)
    assert d.context["loss"] == pytest.approx(float(nn.functional.mse_loss(out, t)), rel=1e-5)
    y = torch.tensor([0, 1, 2, 3, 0])
    d = gradmedic.check(model, x, y)
    assert d.context["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    d = gradmedic.check(model, x, y, loss_fn=lambda o, t: o.abs().mean())
    assert d.context["loss"] == pytest.approx(float(out.abs().mean()), rel=1e-5)


def test_inputs_as_tuple_and_dict():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.a(u) + self.b(v)

    u, v = torch.randn(6, 3), torch.randn(6, 4)
    assert gradmedic.check(Two(), (u, v)).healthy
    assert gradmedic.check(Two(), {"u": u, "v": v}).healthy


def test_bad_arguments():
    model = mlp([8, 4], nn.ReLU)
    x = torch.randn(5, 8)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        gradmedic.check("model", x)
    with pytest.raises(ValueError, match=r"float targets of shape \(5, 3\)"):
        gradmedic.check(model, x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="integer targets"):
        gradmedic.check(model, x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="loss_fn"):
        gradmedic.check(model, x, loss_fn=3)


def test_theory_prediction_in_context_where_covered():
    pytest.importorskip("gradmedic.theory")
    torch.manual_seed(0)
    model = mlp([128] * 12, nn.Tanh, normal(1 / math.sqrt(128) * 0.6))
    d = gradmedic.check(model, torch.randn(64, 128))
    theory = d.context.get("theory")
    if theory is None:
        pytest.skip("theory does not cover this model")
    deltas = list(d.profile["delta_norm"].values())
    measured = (deltas[0] / deltas[-1]) ** (1 / (len(deltas) - 1))
    assert theory["covered"] is True
    assert theory["geometric_mean_gain"] == pytest.approx(measured, rel=0.2)
    assert theory["total_gain"] == pytest.approx(math.prod(theory["gains"]))


def train_until(case, steps: int | None = None):
    """First step the detector fires and first step the loss is NaN."""
    model, x, y = case.build()
    opt = case.optimizer(model)
    fired = nan = None
    with gradmedic.watch(model, opt, update_every=1) as mon:
        for t in range(steps or case.steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            mon.note_loss(loss)
            if nan is None and not math.isfinite(float(loss.detach())):
                nan = t
            loss.backward()
            opt.step()
            if fired is None and mon.diagnose().has(Problem.UNSTABLE_UPDATES):
                fired = t
        final = mon.diagnose()
    return fired, nan, final


@pytest.mark.parametrize("case", TRAINING, ids=lambda c: c.name)
def test_suite_training(case):
    fired, nan, final = train_until(case)
    if case.healthy:
        assert final.healthy, [f.explanation for f in final.findings]
    else:
        assert Problem.UNSTABLE_UPDATES in final.problems
        assert nan is not None and fired is not None and fired < nan


def test_check_sees_gradient_over_time_of_recurrent_models():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(8, 32, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        torch.nn.init.orthogonal_(rnn.weight_hh_l0)
        rnn.weight_hh_l0.mul_(2.0)  # sigma_max = rho = 2: the gradient doubles each step back

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, torch.nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    d = gradmedic.check(Net(), torch.randn(4, 30, 8), torch.randn(4, 1))
    assert d.has("exploding_in_time")
    (finding,) = d.by_problem("exploding_in_time")
    assert finding.evidence["spectral_radius"] == pytest.approx(2.0, rel=1e-4)
    assert finding.evidence["per_step_gain"] > 1.2


def test_model_context_gives_each_layers_own_elements_and_fan_in() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Conv2d(4, 3, 5))
    sizes = model_context(model, ["0", "2"])["layer_size"]
    assert sizes == {"0": (6 * 4 + 4, 6), "2": (3 * 4 * 5 * 5 + 3, 4 * 5 * 5)}


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)


def test_fan_in_follows_the_weight_layout_and_embeddings_have_none() -> None:
    model = nn.Sequential(nn.Embedding(50, 8), Conv1D(32, 8), nn.Linear(32, 4))
    context = model_context(model, ["0", "1", "2"])
    assert context["layer_size"] == {"1": (8 * 32 + 32, 8), "2": (32 * 4 + 4, 32)}
    w = model[1].weight.detach()
    assert context["weight_scale"]["1"] == pytest.approx(float(w.std()) * math.sqrt(8))
    assert "0" not in context["weight_scale"]
