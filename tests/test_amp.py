"""Mixed precision: GradScaler's skipped steps are no problem; statistics in unscaled units."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gradmedic


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


BATCH = (
    torch.randn(64, 16, generator=torch.Generator().manual_seed(3)),
    torch.randn(64, 1, generator=torch.Generator().manual_seed(4)),
)


def fp16_run(steps: int, clip: float | None = None, **scaler_kw: float) -> tuple:
    """A real CPU fp16 autocast + GradScaler loop; a huge initial scale forces skips."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", **scaler_kw)
    x, y = BATCH
    scales = []
    with gradmedic.watch(model, opt) as mon:
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
    return mon, scales


def test_skipped_scaler_steps_are_recorded_as_skipped_and_leak_nothing() -> None:
    mon, scales = fp16_run(8, init_scale=2.0**40, backoff_factor=2.0**-8)
    rows = mon.history.rows()
    skipped = [r for r in rows if r.get("skipped")]
    # The scaler halved (here: divided by 256) its scale on every skipped step.
    n_skipped = sum(1 for a, b in itertools.pairwise(scales) if b < a)
    assert n_skipped >= 2 and len(skipped) == n_skipped == mon.skipped
    assert [r["step"] for r in rows] == list(range(8))
    for row in rows:
        if row.get("skipped"):
            continue
        assert row["global_grad_norm"] < 1e3
        assert all(v < 1e3 for v in row["delta_norm"].values())  # no inf leaked in
        assert not any(row["grad_nonfinite"].values())
    diagnosis = mon.diagnose()
    assert not diagnosis.has("nonfinite")
    assert diagnosis.context.get("skipped_steps") == n_skipped


def test_deltas_and_pre_clip_norms_are_in_unscaled_units() -> None:
    mon, scales = fp16_run(3, clip=0.05, init_scale=2.0**12)
    rows = mon.history.rows()
    assert not any(r.get("skipped") for r in rows)
    # The same step in fp32 without a scaler, deltas and gradients by autograd.
    model = make()
    x, y = BATCH
    outputs = {}
    h = x
    for name, module in model.named_children():
        h = module(h)
        if name in ("0", "2", "4"):
            outputs[name] = h
    loss = nn.functional.mse_loss(h, y)
    grads = torch.autograd.grad(loss, [*outputs.values(), *model.parameters()])
    deltas = dict(zip(outputs, grads[:3], strict=True))
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[3:]]))
    first = rows[0]
    assert first["loss_scale"] == scales[0] == 2.0**12
    for name, d in deltas.items():  # fp16 autocast vs fp32: a few parts in a thousand
        assert first["delta_norm"][name] == pytest.approx(d.norm().item(), rel=2e-2)
    assert first["clip"]["pre_norm"] == pytest.approx(total.item(), rel=2e-2)
    assert first["clip"]["clipped"] and first["clip"]["kind"] == "external"
    assert first["global_grad_norm"] == pytest.approx(0.05, rel=1e-4)


def test_bf16_autocast_trains_and_records() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = BATCH
    with gradmedic.watch(model, opt, activations=True) as mon:
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    rows = mon.history.rows()
    assert len(rows) == 3 and not mon.disabled
    assert all(0 < v < 10 for v in rows[-1]["delta_norm"].values())
    assert "loss_scale" not in rows[-1] and "clip" not in rows[-1]
    assert mon.diagnose().healthy


def test_gradient_accumulation_is_not_a_skip() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = BATCH
    with gradmedic.watch(model, opt) as mon:
        for _ in range(2):
            opt.zero_grad()
            for xs, ys in ((x[:32], y[:32]), (x[32:], y[32:])):
                (nn.functional.mse_loss(model(xs), ys) / 2).backward()
            opt.step()
    rows = mon.history.rows()
    assert mon.skipped == 0 and [r["step"] for r in rows] == [0, 1]
    assert "clip" not in rows[0]  # nothing changed the gradients before the step
    fresh = make()  # the first step's gradient is the full batch's
    grads = torch.autograd.grad(nn.functional.mse_loss(fresh(x), y), list(fresh.parameters()))
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert rows[0]["global_grad_norm"] == pytest.approx(total, rel=1e-5)
