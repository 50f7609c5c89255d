"""The loss reaches the record without the user passing it: closures, model outputs, callbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.history import load_history


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def test_closure_result_is_the_loss() -> None:
    model = make()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    losses = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        return loss

    starts = []
    with gradmedic.watch(model, opt) as mon:
        for _ in range(2):
            starts.append(len(losses))
            opt.step(closure)
    rows = mon.history.rows()
    # LBFGS calls the closure several times a step; the record holds the first (pre-update).
    assert len(losses) > 2
    assert [r["loss"] for r in rows] == pytest.approx([losses[i] for i in starts])


class WithLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def test_a_model_that_returns_its_loss() -> None:
    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradmedic.watch(model, opt) as mon:
        for _ in range(3):
            opt.zero_grad()
            out = model(torch.randn(8, 4), torch.randn(8, 1))
            out["loss"].backward()
            seen.append(out["loss"].item())
            opt.step()
    assert [r["loss"] for r in mon.history.rows()] == pytest.approx(seen)


def test_explicit_loss_wins() -> None:
    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        out = model(torch.randn(8, 4), torch.randn(8, 1))
        out["loss"].backward()
        mon.note_loss(123.0)
        opt.step()
    assert mon.history.rows()[0]["loss"] == 123.0


def test_lightning_records_the_training_loss(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradmedic.integrations.lightning import GradmedicCallback

    seen: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make()

        def training_step(self, batch, batch_idx):
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            seen.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    sink = tmp_path / "pl.jsonl"
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[GradmedicCallback(sink=sink)],
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    _, rows = load_history(sink)
    assert [r["loss"] for r in rows] == pytest.approx(seen)
