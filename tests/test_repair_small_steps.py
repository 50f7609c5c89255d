"""Too small a step: the small_steps detector, the raise_lr and warmup remedies."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from gradmedic.autorepair import Budget, Setup, TrainSettings, train
from gradmedic.autorepair.appliers import compatible, settings_for
from gradmedic.autorepair.examples import _digits_setup, mlp
from gradmedic.diagnose import DiagnosisConfig, diagnose_rows
from gradmedic.diagnose.small_steps import raise_factor
from gradmedic.findings import Problem
from gradmedic.remedies import catalog


def _rows(ratios, losses):
    return [
        {"step": i, "update_ratio": {"0": r / 3, "1": r}, "loss": loss, "lr": [1e-4]}
        for i, (r, loss) in enumerate(zip(ratios, losses, strict=True))
    ]


def test_small_steps_fire_with_a_factor_from_the_recorded_ratios():
    ratios = [4e-5, 6e-5, 5e-5, 7e-5, 5e-5, 6e-5, 4e-5, 5e-5, 6e-5, 5e-5]
    rows = _rows(ratios, [2.30] * 10)
    (finding,) = [f for f in diagnose_rows(rows).findings if f.problem is Problem.SMALL_STEPS]
    median = statistics.median(ratios)  # the largest layer, "1", of each record
    assert finding.evidence["median_update_ratio"] == pytest.approx(median)
    # toward the middle of the healthy band sqrt(1e-3 * 1e-2) = 3.16e-3: 3.16e-3 / 5e-5
    # = 63, so 30x (the 3-10-30-100 ladder's largest step not above it)
    target = math.sqrt(1e-3 * 1e-2)
    assert 30 <= target / median < 100
    raise_lr = finding.remedies[0]
    assert raise_lr.name == "raise_lr" and raise_lr.params["factor"] == 30.0
    assert raise_lr.params["lr"] == [pytest.approx(3e-3)]
    assert finding.remedies[1].name == "adaptive_optimizer"
    assert "(to 0.003)" in raise_lr.description


def test_small_steps_bounds_and_silence():
    # a ratio of 1e-12 (a layer that does not move at all) asks for 3e9x: capped at 100x
    assert raise_factor(1e-12, 3.16e-3) == 100.0
    assert raise_factor(1e-3, 3.16e-3) == 3.0  # never below the lower bound
    assert raise_factor(2e-4, 3.16e-3, (3.0, 10.0)) == 10.0
    tiny = [1e-6] * 10
    # small steps whose loss still falls by more than 10% are enough: no finding
    falling = _rows(tiny, [2.3 - 0.05 * i for i in range(10)])
    assert not diagnose_rows(falling).has(Problem.SMALL_STEPS)
    # healthy steps and a flat loss: another problem, not the step size
    healthy = _rows([5e-3] * 10, [2.3] * 10)
    assert not diagnose_rows(healthy).has(Problem.SMALL_STEPS)
    # fewer than 5 records say nothing about a run's step size (check() records one)
    assert not diagnose_rows(_rows(tiny[:4], [2.3] * 4)).has(Problem.SMALL_STEPS)
    # tiny steps because the gradient vanishes through depth: the vanishing finding alone
    starved = _rows(tiny, [2.3] * 10)
    for row in starved:
        row["delta_norm"] = {"0": 1e-9, "1": 1e-6, "2": 1e-3, "3": 1.0}
    assert diagnose_rows(starved).problems == {Problem.VANISHING}
    # the knobs take effect
    loose = DiagnosisConfig(update_ratio_small=9e-3)
    assert diagnose_rows(_rows([5e-3] * 10, [2.3] * 10), loose).has(Problem.SMALL_STEPS)
    with pytest.raises(ValueError, match="lr_raise_bounds"):
        DiagnosisConfig(lr_raise_bounds=(0.5, 10.0))


def test_too_small_lr_is_diagnosed_from_a_real_run_with_its_own_ratios():
    setup = _digits_setup(lambda: mlp(nn.ReLU, depth=2, width=32, he=True), lr=1e-5)
    out = train(setup, budget=Budget(steps=30), seed=0)
    (finding,) = [f for f in out.diagnosis.findings if f.problem is Problem.SMALL_STEPS]
    # independently: the same run by hand, ||dw|| / ||w|| of every Linear weight per step
    torch.manual_seed(0)
    model = setup.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    from gradmedic.autorepair.problem import train_batches

    batches = train_batches(setup.data[0], 64, torch.Generator().manual_seed(0))
    per_layer: list[list[float]] = [[], [], []]  # the three Linear layers
    for _ in range(30):
        x, y = next(batches)
        opt.zero_grad()
        setup.loss_fn(model(x), y).backward()
        before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
        opt.step()
        after = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
        for ratios, a, b in zip(per_layer, after, before, strict=True):
            ratios.append(float((a - b).norm() / b.norm()))
    # the fastest layer's median ratio (the monitor samples steps and layers, hence rel=0.3)
    mine = max(statistics.median(r) for r in per_layer)
    assert finding.evidence["median_update_ratio"] == pytest.approx(mine, rel=0.3)
    assert finding.remedies[0].params["factor"] == raise_factor(mine, math.sqrt(1e-5))


def test_raise_lr_and_warmup_appliers_match_a_plain_loop():
    settings = settings_for([catalog.raise_lr(30.0), catalog.warmup(0.1, 5)])
    assert settings == TrainSettings(lr_factor=30.0, warmup=(0.1, 5))
    assert not compatible([catalog.adaptive_optimizer(), catalog.raise_lr(10.0)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    setup = Setup(
        lambda: nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)),
        ((x, y), (x, y)),
        nn.MSELoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        batch_size=16,
    )
    out = train(setup, [catalog.raise_lr(10.0), catalog.warmup(0.1, 5)], budget=Budget(steps=8))
    # by hand: SGD at lr 0.1 ramped linearly from 0.01 over 5 steps
    from gradmedic.autorepair.problem import train_batches

    torch.manual_seed(0)
    model = setup.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = train_batches(setup.data[0], 16, torch.Generator().manual_seed(0))
    for step in range(8):
        for group in opt.param_groups:
            group["lr"] = 0.1 * (0.1 + 0.9 * min(step, 5) / 5)
        xb, yb = next(batches)
        opt.zero_grad()
        setup.loss_fn(model(xb), yb).backward()
        opt.step()
    for a, b in zip(out.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
