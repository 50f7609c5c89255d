"""float16 autocast without loss scaling: gradients below 6e-8 flush to 0 at once.

The delta into every layer but the head is exactly 0 on every record, with no decay
through the layers first (the loss itself is tiny): a vanishing finding whose first
fix is loss scaling, which does fix it. A zero-initialized head (0 only until its
first update) under float16 is no finding.
"""

from __future__ import annotations

import torch
from torch import nn

import gradmedic


def build(zero_head: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    if zero_head:
        nn.init.zeros_(model[4].weight)
    return model


def train(
    model: nn.Module, steps: int = 8, half: bool = True, scaler: bool = False, scale: float = 2e-5
):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grad_scaler = torch.amp.GradScaler("cpu") if scaler else None
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 1, generator=gen) * 1e-4
    with gradmedic.watch(model, opt) as mon:
        for _ in range(steps):
            x = torch.rand(512, 64, generator=gen)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), x @ w) * scale
            if grad_scaler is None:
                loss.backward()
                opt.step()
            else:
                grad_scaler.scale(loss).backward()
                grad_scaler.step(opt)
                grad_scaler.update()
    return mon


def test_float16_flush_is_vanishing_with_loss_scaling_first() -> None:
    model = build()
    mon = train(model)
    rows = mon.history.rows()
    assert all(r["grad_norm"]["0"] == 0.0 and r["grad_norm"]["4"] > 0 for r in rows)
    assert float(model[0].weight.grad.abs().max()) == 0.0  # the truth: nothing reached it
    (finding,) = mon.diagnose().by_problem("vanishing")
    assert finding.severity.value == "critical"
    assert finding.layers == ["0", "2"]
    assert finding.evidence["float16"] is True and finding.evidence["total_gain"] == 0.0
    assert "float16" in finding.explanation and "6e-8" in finding.explanation
    assert finding.remedies[0].name == "loss_scaling"
    assert "GradScaler('cpu')" in finding.remedies[0].call


def test_the_loss_scaling_it_names_fixes_it() -> None:
    mon = train(build(), scaler=True)
    rows = [r for r in mon.history.rows() if not r.get("skipped")]
    assert rows and all(r["grad_norm"]["0"] > 0 for r in rows)
    assert not mon.diagnose().has("vanishing")


def test_the_same_run_in_float32_reaches_every_layer() -> None:
    mon = train(build(), half=False)
    assert all(r["grad_norm"]["0"] > 0 for r in mon.history.rows())
    assert not mon.diagnose().has("vanishing")


def test_a_zero_initialized_head_under_float16_is_no_finding() -> None:
    model = build(zero_head=True)
    mon = train(model, scale=1.0)  # a normal-sized loss: only the head's zeros cut step 0
    rows = mon.history.rows()
    assert rows[0]["grad_norm"]["0"] == 0.0 and rows[-1]["grad_norm"]["0"] > 0
    assert not mon.diagnose().has("vanishing")


def test_a_flush_despite_a_grad_scaler_says_so_and_proposes_no_reinit() -> None:
    from gradmedic.diagnose import diagnose_rows

    names = [f"l{i}" for i in range(6)]
    values = {n: (0.0 if i < 3 else 1e-2 * (i + 1)) for i, n in enumerate(names)}
    rows = [
        {"step": s, "delta_norm": dict(values), "loss": 1.0, "loss_scale": 65536.0}
        for s in range(6)
    ]
    context = {"layers": names, "float16_layers": dict.fromkeys(names, "cuda")}
    (finding,) = diagnose_rows(rows, layers=names, context=context).by_problem("vanishing")
    assert "even with the loss scaled by 65536 (GradScaler)" in finding.explanation
    kinds = {gradmedic.remedies.registry.kind_of(r).name for r in finding.remedies}
    assert "init_scheme" not in kinds and "loss_scaling" not in kinds
