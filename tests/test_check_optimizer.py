"""check(..., optimizer=...): curvature, stability limits, trial steps, the finding."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.curvature import sharpness, stability_limit, top_eigenvalue
from gradmedic.errors import GradmedicError
from gradmedic.findings import Problem
from gradmedic.learnable import linear_headroom
from gradmedic.step_size import StepJudgement, constant_baseline, windowed
from gradmedic.trial_steps import facts_of, minibatches, take, trial_steps


def _quadratic(h: torch.Tensor, x: torch.Tensor):
    return lambda: 0.5 * x @ h @ x


def test_sharpness_is_the_top_algebraic_eigenvalue_where_power_iteration_finds_the_negative():
    torch.manual_seed(0)
    a = torch.randn(40, 40, dtype=torch.float64)
    h = (a + a.T) / 2
    h[0, 0] -= 40.0  # a negative eigenvalue larger in magnitude than the top
    x = torch.randn(40, dtype=torch.float64, requires_grad=True)
    evals = torch.linalg.eigvalsh(h)
    top = sharpness(_quadratic(h, x), [x], iterations=40, tol=1e-8)
    assert top.value == pytest.approx(float(evals[-1]), rel=1e-6)
    power = top_eigenvalue(_quadratic(h, x), [x], iterations=200, tol=1e-10)
    assert power.value == pytest.approx(float(evals[0]), rel=1e-4)  # largest magnitude


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_d_h():
    torch.manual_seed(1)
    a = torch.randn(20, 20, dtype=torch.float64)
    h = a @ a.T
    d = torch.rand(20, dtype=torch.float64) + 0.1
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    got = sharpness(_quadratic(h, x), [x], iterations=20, tol=1e-10, scale=[d]).value
    expected = float(torch.linalg.eigvals(torch.diag(d) @ h).real.max())
    assert got == pytest.approx(expected, rel=1e-6)


def _largest_stable_lam(opt_factory, lam_grid) -> float:
    """The largest curvature on ``lam_grid`` where ``opt_factory`` does not blow up (simulated)."""
    stable = 0.0
    for lam in lam_grid:
        w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        opt = opt_factory([w])
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * w**2).sum().backward()
            opt.step()
        if abs(float(w.detach())) < 1.0:
            stable = lam
    return stable


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.5, "dampening": 0.3},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    ],
    ids=["sgd", "heavy_ball", "dampening", "nesterov"],
)
def test_stability_limit_matches_a_simulated_quadratic(kwargs):
    factory = functools.partial(torch.optim.SGD, **kwargs)
    limit = stability_limit(facts_of(factory([torch.zeros(1, requires_grad=True)]))).limit
    grid = [limit * f for f in (0.9, 0.97, 0.995, 1.005, 1.03, 1.1)]
    assert _largest_stable_lam(factory, grid) == pytest.approx(limit * 0.995)


def test_trial_steps_leave_model_optimizer_and_every_rng_bit_identical():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # non-empty optimizer state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    grads = [p.grad.clone() for p in model.parameters()]
    random.seed(7)
    np.random.seed(7)
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()

    d = gradmedic.check(model, x, y, optimizer=opt, trial_steps=5)

    assert len(d.context["step_size"]["trial_losses"]) == 5
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    for p, s in opt.state.items():
        for k, v in s.items():
            before = opt_state[id(p)][k]
            assert torch.equal(v, before) if torch.is_tensor(v) else v == before
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_rng, strict=True))
    assert model.training


def _regression(seed: int = 0, learnable: bool = False):
    """Linear least squares: the Hessian is X^T X * 2 / n, known in closed form.

    Random targets by default (nothing to learn), or a linear function of the inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=gen) * torch.tensor([3.0, 1, 1, 1, 1, 0.5])
    y = x @ torch.randn(6, 1, generator=gen) if learnable else torch.randn(64, 1, generator=gen)
    model = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / 64)[-1])
    return model, x, y, lam


def test_too_large_an_sgd_step_is_found_with_the_closed_form_sharpness_and_safe_lr():
    model, x, y, lam = _regression()
    lr = 3.0 / lam  # past 2/lambda
    d = gradmedic.check(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    f = d.by_problem(Problem.UNSTABLE_UPDATES)[0]
    ev = f.evidence
    assert ev["rule"] == "diverged"  # |1 - lr lam| = 2 per step: the loss grows 4x a step
    assert ev["sharpness_init"] == pytest.approx(lam, rel=1e-3)
    assert ev["limit"] == pytest.approx(2 / lr)
    assert ev["largest_safe_lr"] == pytest.approx(2 / lam, rel=1e-3)
    lower = next(r for r in f.remedies if r.name == "lower_lr")
    # half the edge, the factor rounded to two significant digits
    assert lower.params["lr"][0] == pytest.approx(0.5 * 2 / lam, rel=0.06)
    assert d.suggested["lr_factor"] == lower.params["factor"]  # one lr rule in the diagnosis
    assert 1e-3 <= lower.params["factor"] <= 0.5
    assert f"first {ev['trial_steps']} steps" in f.explanation
    assert ev["trial_steps"] < 300 and not math.isfinite(ev["trial_losses"][-1])


def test_a_step_inside_the_limit_is_healthy_and_reported():
    model, x, y, lam = _regression()
    factory = functools.partial(torch.optim.SGD, lr=1.0 / lam, momentum=0.5)
    d = gradmedic.check(model, x, y, optimizer=factory)
    assert d.healthy, [f.explanation for f in d.findings]
    s = d.context["step_size"]
    assert s["limit"]["limit"] == pytest.approx(2 * 1.5 * lam)
    assert s["sharpness_init"] == pytest.approx(lam, rel=1e-3)
    assert s["largest_safe_lr"] == pytest.approx(3.0 / lam, rel=1e-3)


def test_adam_preconditioned_sharpness_uses_the_bias_corrected_first_step():
    model, x, y, _ = _regression()
    with torch.no_grad():
        model.weight.fill_(0.3)
    d = gradmedic.check(model, x, y, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    s = d.context["step_size"]
    # independent: D = lr / (|g0| + eps), H = 2 X^T X / n, top eigenvalue of D H
    w = model.weight.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.mse_loss(x @ w.T, y), [w])
    dmat = torch.diag((1e-3 / (g.abs() + 1e-8)).reshape(-1).double())
    expected = float(torch.linalg.eigvals(dmat @ (2 * x.T @ x / 64).double()).real.max())
    assert s["sharpness_init"] == pytest.approx(expected, rel=1e-3)
    assert s["limit"]["limit"] == pytest.approx((2 + 2 * 0.9) / (1 - 0.9))
    assert d.healthy


def test_check_without_optimizer_has_no_step_size():
    model, x, y, _ = _regression()
    assert "step_size" not in gradmedic.check(model, x, y).context


def test_an_optimizer_over_other_tensors_is_a_clear_error():
    model, x, y, _ = _regression()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(GradmedicError, match="not parameters of the model"):
        gradmedic.check(model, x, y, optimizer=other)
    with pytest.raises(TypeError, match="optimizer must be"):
        gradmedic.check(model, x, y, optimizer=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trial_steps"):
        gradmedic.check(model, x, y, optimizer=other, trial_steps=-1)


def test_trial_steps_alone_restore_numpy_and_python_rng():
    model = nn.Linear(2, 1)
    np.random.seed(1)
    expected = np.random.rand()
    np.random.seed(1)

    def loss(m):
        np.random.rand()  # a loss that draws from NumPy
        random.random()
        return m(torch.ones(3, 2)).pow(2).mean()

    run = trial_steps(model, functools.partial(torch.optim.SGD, lr=0.1), loss, steps=3)
    assert len(run.losses) == 3 and math.isfinite(run.losses[-1])
    assert np.random.rand() == expected


def test_a_far_too_large_lr_on_an_mlp_is_critical_with_a_bounded_remedy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    d = gradmedic.check(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=50.0))
    (f,) = d.by_problem(Problem.UNSTABLE_UPDATES)
    s = d.context["step_size"]
    # the first step is past the limit; the net lands in a flat, saturated region whose
    # loss stays above where it started
    assert s["sharpness_init"] > s["limit"]["limit"] == pytest.approx(2 / 50.0)
    assert f.evidence["rule"] == "sharpness" and s["fit_end"] >= s["reference"]
    lower = next(r for r in f.remedies if r.name == "lower_lr")
    edge = 2 / max(s["sharpness_init"], s["sharpness_trial"])  # the lr at the limit
    assert lower.params["lr"][0] == pytest.approx(0.5 * edge, rel=0.06)
    assert 1e-3 <= lower.params["factor"] <= 0.5  # bounded: never lr x1e-30


@pytest.mark.slow
def test_agreement_on_a_small_trainability_grid_is_computed_and_has_no_false_alarm():
    from gradmedic.trainability import OPTIMIZERS, agreement, false_alarms, run_cell

    torch.set_num_threads(1)
    # (10, 0.5) learns too slowly under SGD and (40, 3.5) gets stuck under momentum:
    # check() without the optimizer calls both healthy
    cells = [run_cell(d, s) for d, s in ((5, 1.0), (10, 0.5), (20, 0.5), (40, 3.5))]
    for name in OPTIMIZERS:
        # independent of the predictors: the outcome is the accuracy, and one cell fails
        assert any(not c.trains(name) for c in cells) and any(c.trains(name) for c in cells)
        assert false_alarms(cells, name, "check_with") == 0
        assert agreement(cells, name, "check_with") > agreement(cells, name, "check")
        assert agreement(cells, name, "check_with") >= 0.95  # the target


def test_a_live_monitor_on_the_model_does_not_record_the_trial_steps():
    model, x, y, _ = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt, every=1) as mon:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        gradmedic.check(model, x, y, optimizer=opt, trial_steps=4)
        assert mon.steps == 1 and len(mon.history) == 1


def test_hooks_on_the_users_model_do_not_run_on_the_copies():
    model, x, y, _ = _regression()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    gradmedic.check(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert len(calls) == 1  # check()'s own forward; none of the trial or curvature passes


SGD_LIMIT = stability_limit({"type": "SGD", "lr": [0.01], "momentum": [0.0]})  # 2/lr = 200


def _judged(losses, *, reference=2.0, headroom=0.3, sharpness=(1.0, 1.0)):
    return StepJudgement(
        "SGD",
        0.01,
        SGD_LIMIT,
        sharpness[0],
        sharpness[1],
        trial_losses=[float(v) for v in losses],
        planned_steps=len(losses),
        reference=reference,
        headroom=headroom,
    )


def test_windowed_means_and_the_constant_baselines_by_hand():
    assert windowed([1.0, 3.0, 5.0, 7.0], 3) == [3.0, 5.0]
    # entropy of frequencies (1/4, 3/4)
    p = [0.25, 0.75]
    expected = -sum(q * math.log(q) for q in p)
    assert constant_baseline(torch.tensor([1, 0, 0, 0])) == pytest.approx(expected)
    y = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # per-column variance 1 and 4
    assert constant_baseline(y) == pytest.approx(2.5)


def test_a_trial_that_learns_is_healthy_and_a_flat_one_on_learnable_data_is_small_steps():
    falling = [2.0 * 0.98**k for k in range(300)]
    assert _judged(falling).verdict == "healthy" and _judged(falling).finding() is None
    flat = [2.0] * 300
    f = _judged(flat).finding()
    assert f is not None and f.problem == Problem.SMALL_STEPS
    raise_lr = next(r for r in f.remedies if r.name == "raise_lr")
    # room = limit / sharpness = 200; half of it is 100, bounded at 10x
    assert raise_lr.params["factor"] == 10.0
    assert "first 300 steps" in f.explanation and "200" in f.explanation


def test_a_stall_after_a_blow_up_is_an_overshoot_not_small_steps():
    # Inside the limit at init and after the trial (sharpness 1 << 200), but the loss jumped
    # to 30x its start at step 5 (>= loss_rise**2 = 9x) and then stalled: the steps overshot.
    spiked = [2.0] * 5 + [60.0] + [2.0] * 294
    j = _judged(spiked)
    assert j.verdict == "no_fit" and j.rose == 5
    f = j.finding()
    assert f is not None and f.problem == Problem.UNSTABLE_UPDATES
    cut = next(r for r in f.remedies if r.name == "lower_lr")
    assert cut.params["factor"] == 0.1  # no curvature-sized cut: the stable lr is above lr
    assert "step 5" in f.explanation and "raise_lr" not in [r.name for r in f.remedies]
    below = [2.0] * 5 + [17.0] + [2.0] * 294  # 8.5x: under the level, still a stall
    assert _judged(below).rose is None
    assert _judged(below).finding().problem == Problem.SMALL_STEPS


def test_a_flat_trial_on_random_labels_is_no_finding():
    assert _judged([2.0] * 300, headroom=1.2).verdict == "healthy"


def test_a_slow_but_steady_descent_is_not_a_stall():
    # ends above half the reference 2.0, but its last quarter (67 windows) fell by
    # 0.003 * 67 = 0.2: another 300 steps at that rate reach half the reference
    j = _judged([2.0 - 0.003 * k for k in range(300)])
    assert j.fit[-1] > 0.5 * 2.0 and not j.stalled and j.verdict == "healthy"
    # the same descent, then flat above half: stalled
    assert _judged([2.0 - 0.003 * k for k in range(150)] + [1.55] * 150).verdict == "no_fit"


def test_a_trial_that_learns_and_falls_back_is_not_called_untrainable():
    # trials that fell back trained as often as they failed on the grid: no verdict
    down = [2.0 * 0.97**k for k in range(150)]
    j = _judged(down + [1.6] * 150, sharpness=(50.0, 150.0))
    assert min(j.fit) < 0.5 * 2.0 and j.verdict == "healthy"


def test_a_step_past_the_limit_whose_loss_does_not_fall_is_unstable_with_a_sized_lr():
    j = _judged([2.0] * 5 + [2.5] * 5, sharpness=(50.0, 2000.0))  # 10x past 2/lr
    assert j.verdict == "sharpness"
    f = j.finding()
    assert f is not None and f.problem == Problem.UNSTABLE_UPDATES
    # largest safe lr = lr * limit / sharpness = 0.01 * 200 / 2000 = 1e-3; half of it
    assert f.evidence["largest_safe_lr"] == pytest.approx(1e-3)
    lower = next(r for r in f.remedies if r.name == "lower_lr")
    assert lower.params["factor"] == pytest.approx(0.05)


def test_a_stuck_trial_past_the_limit_is_unstable_and_a_nonfinite_one_diverged():
    j = _judged([1.8] * 300, sharpness=(4000.0, 10.0))  # past the limit at init
    assert j.verdict == "no_fit"
    f = j.finding()
    assert f is not None and f.problem == Problem.UNSTABLE_UPDATES
    assert f.evidence["lr_factor"] == pytest.approx(0.5 * 200 / 4000)
    assert _judged([2.0, 3.0, math.inf]).verdict == "diverged"


def test_minibatches_cover_every_example_once_per_epoch_and_take_indexes_the_batch():
    index = minibatches(10, 4)
    epoch = torch.cat([index(0), index(1)])  # 10 // 4 = 2 steps per epoch
    assert len(set(epoch.tolist())) == 8 and len(index(2)) == 4
    batch = {"x": torch.arange(10.0), "mask": torch.ones(3)}
    got = take(batch, torch.tensor([2, 5]), 10)
    assert got["x"].tolist() == [2.0, 5.0] and got["mask"].shape == (3,)


def test_linear_headroom_tells_a_linear_rule_from_random_labels():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 8, generator=gen)
    assert linear_headroom(x, (x[:, 0] + x[:, 1] > 0).long()) < 0.9
    assert linear_headroom(x, torch.randint(0, 4, (256,), generator=gen)) > 0.9
    assert math.isnan(linear_headroom({"x": x}, None))


def test_a_trial_that_fits_stops_early():
    model, x, y, lam = _regression(learnable=True)
    d = gradmedic.check(model, x, y, optimizer=functools.partial(torch.optim.SGD, lr=1.0 / lam))
    s = d.context["step_size"]
    losses = s["trial_losses"]
    assert d.healthy and 100 <= len(losses) < 300
    # the loss at init of a zero-weight model is mean(y^2), above var(y)
    reference = min(float(y.pow(2).mean()), float(y.var(unbiased=False)))
    assert s["reference"] == pytest.approx(reference, rel=1e-5)
    tail = losses[-(len(losses) // 10) :]
    assert sum(tail) / len(tail) <= 0.1 * reference


def test_far_too_small_an_lr_on_learnable_data_is_small_steps_with_a_bounded_raise():
    model, x, y, lam = _regression(learnable=True)
    d = gradmedic.check(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=1e-5 / lam))
    (f,) = d.by_problem(Problem.SMALL_STEPS)
    assert f.evidence["rule"] == "no_fit"
    assert f.evidence["sharpness_init"] == pytest.approx(lam, rel=1e-3)
    raise_lr = next(r for r in f.remedies if r.name == "raise_lr")
    assert raise_lr.params["factor"] == 10.0  # room 2e5x, bounded
    assert d.suggested["lr_factor"] == 10.0


def test_a_net_that_cannot_fit_random_labels_is_healthy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(128, 10), torch.randint(0, 3, (128,))
    d = gradmedic.check(model, x, y, optimizer=functools.partial(torch.optim.SGD, lr=1e-3))
    assert d.healthy, [f.explanation for f in d.findings]
    assert d.context["step_size"]["headroom"] > 0.9
