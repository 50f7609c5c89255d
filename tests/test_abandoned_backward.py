"""A backward pass no optimizer step follows: a skipped step, or no step of this optimizer.

GradScaler skips a step whose gradients hold inf/NaN (and lowers its scale): that
is a step, recorded as ``skipped``, also when it is the run's last. A GAN's
generator loss backpropagates through the discriminator, whose optimizer does not
step on it: the discriminator's monitor must not count it (its steps are its
optimizer's steps).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic


def test_a_gan_discriminator_counts_only_its_own_steps() -> None:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    disc = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    og = torch.optim.Adam(gen.parameters(), lr=1e-3)
    od = torch.optim.Adam(disc.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    real = torch.randn(32, 8)
    seen: list[float] = []
    with gradmedic.watch(disc, od) as mon_d, gradmedic.watch(gen, og) as mon_g:
        for _ in range(6):
            z = torch.randn(32, 4)
            od.zero_grad()
            fake = gen(z).detach()
            loss_d = bce(disc(real), torch.ones(32, 1)) + bce(disc(fake), torch.zeros(32, 1))
            loss_d.backward()
            seen.append(float(torch.stack([p.grad.norm() for p in disc.parameters()]).norm()))
            od.step()
            og.zero_grad()
            bce(disc(gen(z)), torch.ones(32, 1)).backward()  # fills disc's .grad too
            og.step()
    rows = mon_d.history.rows()
    assert [r["step"] for r in rows] == list(range(6)) and mon_d.skipped == 0
    # each record is the discriminator's own loss, not the generator's pass through it
    assert [r["global_grad_norm"] for r in rows] == [pytest.approx(v, rel=1e-5) for v in seen]
    assert mon_d.diagnose().context.get("skipped_steps") is None
    assert [r["step"] for r in mon_g.history.rows()] == list(range(6))


def _fp16_loop(
    steps: int, blow_up_at: set[int], init_scale: float, growth_interval: int = 2000
) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    scales = []
    with gradmedic.watch(model, opt) as mon:
        for step in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            if step in blow_up_at:
                loss = loss * 1e30  # inf gradients in float16: the scaler skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(float(scaler.get_scale()))
    return mon, scales


def test_a_scaler_skip_after_good_steps_is_a_skipped_step() -> None:
    mon, scales = _fp16_loop(6, {3}, init_scale=2.0**8)
    rows = mon.history.rows()
    assert scales[3] < scales[2]  # the scaler did skip step 3
    assert [r["step"] for r in rows] == list(range(6))
    assert [bool(r.get("skipped")) for r in rows] == [False, False, False, True, False, False]
    assert mon.skipped == 1


def test_a_skip_right_after_the_scale_grew_is_a_skipped_step() -> None:
    # the scale doubles every step, then an overflow halves it back to the last record's
    mon, scales = _fp16_loop(6, {3}, init_scale=2.0**8, growth_interval=1)
    assert scales[:4] == [512.0, 1024.0, 2048.0, 1024.0]
    rows = mon.history.rows()
    assert [r["step"] for r in rows] == list(range(6))
    assert [bool(r.get("skipped")) for r in rows] == [False, False, False, True, False, False]


def test_the_last_skipped_step_is_recorded_at_close() -> None:
    mon, _ = _fp16_loop(4, {3}, init_scale=2.0**8)
    rows = mon.history.rows()
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1].get("skipped")
    assert mon.skipped == 1


def test_every_step_skipped_is_every_record_skipped() -> None:
    mon, _ = _fp16_loop(3, {0, 1, 2}, init_scale=2.0**8)
    assert [r.get("skipped") for r in mon.history.rows()] == [True, True, True]
    assert mon.diagnose().status == "no_records"


def test_an_extra_backward_without_a_step_is_no_step() -> None:
    # e.g. a gradient computed for a probe or a penalty, then cleared: finite, no step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            model(x).sum().backward()  # looked at, never stepped on
    assert [r["step"] for r in mon.history.rows()] == [0, 1, 2, 3] and mon.skipped == 0
