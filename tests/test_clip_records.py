"""Pre-clip and post-clip norms are recorded whichever clipper ran."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.history import load_history
from gradmedic.remedies import clipping


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def reference_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-layer and global gradient norms of one batch, by autograd, before any clipping."""
    loss = nn.functional.mse_loss(model(x), y)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    out: dict[str, float] = {}
    for layer in ("0", "2", "4"):
        sq = sum(g.square().sum() for n, g in zip(names, grads, strict=True) if n.startswith(layer))
        out[layer] = float(sq.sqrt())
    out["global"] = float(torch.stack([g.square().sum() for g in grads]).sum().sqrt())
    return out


@pytest.mark.parametrize(
    "clip",
    [
        lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.01),
        lambda ps: torch.nn.utils.clip_grad_value_(ps, 1e-3),
        lambda ps: clipping.clip_grad_norm_(ps, 0.01),
        lambda ps: clipping.clip_grad_value_(ps, 1e-3),
    ],
    ids=["torch-norm", "torch-value", "gradmedic-norm", "gradmedic-value"],
)
def test_every_clipper_leaves_pre_and_post_clip_norms(clip) -> None:
    model = make()
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    expected = reference_norms(make(), x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        clip(list(model.parameters()))
        post = float(torch.stack([p.grad.square().sum() for p in model.parameters()]).sum().sqrt())
        opt.step()
    row = mon.history.rows()[0]
    assert row["clip"]["clipped"] is True
    assert row["clip"]["pre_norm"] == pytest.approx(expected["global"], rel=1e-5)
    assert row["clip"]["post_norm"] == pytest.approx(post, rel=1e-5)
    assert row["global_grad_norm"] == pytest.approx(post, rel=1e-5)
    for layer in ("0", "2", "4"):
        assert row["pre_clip_grad_norm"][layer] == pytest.approx(expected[layer], rel=1e-5)


def test_no_clip_field_when_nothing_was_clipped() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # a threshold never reached
        opt.step()
    row = mon.history.rows()[0]
    assert "clip" not in row and "pre_clip_grad_norm" in row  # changed by x1.0: not clipped


def test_lightning_gradient_clip_val_pre_and_post(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradmedic.integrations.lightning import GradmedicCallback

    x, y = torch.randn(16, 8), torch.randn(16, 1)
    expected = reference_norms(make(), x, y)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make()

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    sink = tmp_path / "pl.jsonl"
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.01,
        default_root_dir=tmp_path,
        callbacks=[GradmedicCallback(sink=sink)],
    )
    trainer.fit(Module(), loader)
    _, rows = load_history(sink)
    assert rows[0]["clip"]["pre_norm"] == pytest.approx(expected["global"], rel=1e-5)
    assert rows[0]["global_grad_norm"] == pytest.approx(0.01, rel=1e-4)
    assert rows[0]["pre_clip_grad_norm"]["net.0"] == pytest.approx(expected["0"], rel=1e-5)


def test_hf_trainer_max_grad_norm_matches_its_own_log(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradmedic.integrations.transformers import GradmedicTrainerCallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": nn.functional.mse_loss(out, labels), "logits": out}

    data = [{"x": torch.randn(8), "labels": torch.randn(1)} for _ in range(32)]
    sink = tmp_path / "hf.jsonl"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=16,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        max_grad_norm=0.01,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=Model(),
        args=args,
        train_dataset=data,
        callbacks=[GradmedicTrainerCallback(sink=sink)],
    )
    trainer.train()
    _, rows = load_history(sink)
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(logged) == len(rows) == 2
    for row, hf_norm in zip(rows, logged, strict=True):
        assert row["clip"]["pre_norm"] == pytest.approx(hf_norm, rel=1e-4)  # HF logs pre-clip
        assert row["global_grad_norm"] == pytest.approx(0.01, rel=1e-4)


def test_a_middle_gradient_edited_in_place_is_read_again_and_is_no_clip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 8)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            before = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model[2].parameters()))
            for p in model[2].parameters():
                p.grad.zero_()  # the middle layer frozen for this step, in place
            opt.step()
            row = mon.history.rows()[-1]
            assert row["grad_norm"]["2"] == 0.0  # read again, not the snapshot's
            assert row["grad_norm"]["0"] > 0 and row["grad_max"]["2"] == 0.0
            assert row["pre_clip_grad_norm"]["2"] == pytest.approx(before, rel=1e-5)
            assert "clip" not in row  # a cleared gradient is no clipping
