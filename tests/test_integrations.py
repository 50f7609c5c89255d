"""Lightning and Hugging Face Trainer callbacks record real steps and diagnose them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.history import load_history


def sigmoid_stack(depth: int = 20, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class HFModel(nn.Module):
    """A sigmoid stack that returns its loss the way Hugging Face models do."""

    def __init__(self, depth: int = 20, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.net = sigmoid_stack(depth=depth)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def test_lightning_callback(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradmedic.integrations.lightning import GradmedicCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = sigmoid_stack()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    sink = tmp_path / "pl.jsonl"
    callback = GradmedicCallback(sink=sink)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    module = Module()
    trainer.fit(module, loader)
    header, rows = load_history(sink)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert header["layers"][0] == "net.0"
    assert callback.diagnosis is not None and callback.diagnosis.has("vanishing")
    assert callback.monitor is None  # detached at the end
    # Recorded after Lightning's clipping: the global norm is at most the clip value.
    assert all(r["global_grad_norm"] <= 0.5 + 1e-5 for r in rows)
    assert all(not m._forward_hooks for m in module.modules())


def test_transformers_trainer_callback(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradmedic.integrations.transformers import GradmedicTrainerCallback

    data = [{"x": torch.randn(16), "labels": torch.randn(1)} for _ in range(48)]
    sink = tmp_path / "hf.jsonl"
    callback = GradmedicTrainerCallback(sink=sink)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=16,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        max_grad_norm=0.5,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=HFModel(), args=args, train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    _header, rows = load_history(sink)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert callback.diagnosis is not None and callback.diagnosis.has("vanishing")
    assert all(r["global_grad_norm"] <= 0.5 + 1e-5 for r in rows)


def test_transformers_series_reach_the_trainer_state_log_history(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradmedic.integrations.transformers import GradmedicTrainerCallback

    data = [{"x": torch.randn(16), "labels": torch.randn(1)} for _ in range(48)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=16, report_to=[],
        use_cpu=True, logging_strategy="steps", logging_steps=1, save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    callback = GradmedicTrainerCallback(show=False)
    trainer = transformers.Trainer(
        model=HFModel(), args=args, train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3
    for entry in logged:  # post-clip (max_grad_norm 1.0) where the Trainer logs pre-clip
        assert 0 < entry["gradmedic/grad_norm/global"] <= min(1.0, entry["grad_norm"]) + 1e-5


def test_innermost_optimizer_unwraps() -> None:
    from gradmedic.integrations._session import innermost_optimizer

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    assert innermost_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="Optimizer"):
        innermost_optimizer(Wrapper(object()))
    assert gradmedic.watch  # public API stays importable without the frameworks


class _PlModule:
    """A Lightning module over a sigmoid stack (built lazily: lightning is optional)."""

    @staticmethod
    def make():
        pl = pytest.importorskip("lightning.pytorch")

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = sigmoid_stack(depth=12)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.mse_loss(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return pl, Module


def _loader():
    data = torch.utils.data.TensorDataset(torch.randn(96, 16), torch.randn(96, 1))
    return torch.utils.data.DataLoader(data, batch_size=16)


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_lightning_logs_to_tensorboard_saves_and_resumes(tmp_path, capsys) -> None:
    pytest.importorskip("tensorboard")
    pl, Module = _PlModule.make()
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradmedic.integrations.lightning import GradmedicCallback

    def trainer(max_steps, callback, checkpoint):
        return pl.Trainer(
            max_steps=max_steps, accelerator="cpu", log_every_n_steps=2,
            logger=TensorBoardLogger(str(tmp_path), name="tb", version=0),
            enable_checkpointing=checkpoint, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
        )  # fmt: skip

    sink = tmp_path / "pl.jsonl"
    first = GradmedicCallback(sink=sink)
    t1 = trainer(4, first, True)
    t1.fit(Module(), _loader())
    _header, rows = load_history(sink)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(isinstance(r.get("loss"), float) for r in rows)  # the training step's loss
    acc = _events(t1.logger.log_dir)
    glob = [(e.step, e.value) for e in acc.Scalars("gradmedic/grad_norm/global")]
    assert [s for s, _ in glob] == [0, 2]  # every log_every_n_steps
    expected = [rows[0]["global_grad_norm"], rows[2]["global_grad_norm"]]
    assert [v for _, v in glob] == pytest.approx(expected, rel=1e-6)
    saved = json.loads((tmp_path / "tb" / "version_0" / "gradmedic-diagnosis.json").read_text())
    assert "vanishing" in [f["problem"] for f in saved["findings"]]
    assert "gradmedic: " in capsys.readouterr().err  # the short diagnosis, printed

    # Resume from the checkpoint: the diagnosis covers the whole run, steps continued.
    (ckpt,) = (tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt")
    second = GradmedicCallback()
    trainer(6, second, False).fit(Module(), _loader(), ckpt_path=str(ckpt))
    assert second.diagnosis is not None and second.diagnosis.coverage.steps == 6
    assert second.diagnosis.coverage.last_step == 5


def test_transformers_series_reach_every_report_to_backend(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from gradmedic.integrations.transformers import GradmedicTrainerCallback

    data = [{"x": torch.randn(16), "labels": torch.randn(1)} for _ in range(64)]
    sink = tmp_path / "hf.jsonl"
    callback = GradmedicTrainerCallback(sink=sink)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16,
        report_to=["tensorboard"], logging_steps=2,
        use_cpu=True, save_strategy="no", learning_rate=1e-2, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=HFModel(depth=12), args=args, train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    _header, rows = load_history(sink)
    assert all(isinstance(r.get("loss"), float) for r in rows)  # the model's returned loss
    # on_log adds the series to the logs every reporter receives (TensorBoard here)
    (run_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    points = _events(run_dir).Scalars("train/gradmedic/grad_norm/global")
    assert [e.step for e in points] == [2, 4]
    expected = [rows[1]["global_grad_norm"], rows[3]["global_grad_norm"]]
    assert [e.value for e in points] == pytest.approx(expected, rel=1e-6)
    saved = json.loads((tmp_path / "out" / "gradmedic-diagnosis.json").read_text())
    assert "vanishing" in [f["problem"] for f in saved["findings"]]
    assert "gradmedic: " in capsys.readouterr().err


def test_transformers_checkpoints_keep_the_records_and_a_resume_continues_them(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradmedic.integrations.transformers import STATE_FILE, GradmedicTrainerCallback

    torch.manual_seed(1)
    data = [{"x": torch.randn(16), "labels": torch.randn(1)} for _ in range(96)]

    def train(max_steps, callback, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=16,
            report_to=[], use_cpu=True, logging_strategy="no", save_strategy="steps",
            save_steps=2, learning_rate=1e-2, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=HFModel(seed=0), args=args, train_dataset=data, callbacks=[callback]
        )
        trainer.train(resume_from_checkpoint=resume)

    first = GradmedicTrainerCallback(show=False)
    train(4, first)
    saved = json.loads((tmp_path / "checkpoint-4" / STATE_FILE).read_text())
    assert [r["step"] for r in saved["rows"]] == [0, 1, 2, 3] and saved["offset"] == 4
    at_two = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert [r["step"] for r in at_two["rows"]] == [0, 1]
    assert at_two["rows"][1]["global_grad_norm"] == pytest.approx(
        saved["rows"][1]["global_grad_norm"], rel=1e-12
    )

    second = GradmedicTrainerCallback(show=False)
    train(6, second, resume=str(tmp_path / "checkpoint-4"))
    rows = second.session.rows()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[2]["global_grad_norm"] == saved["rows"][2]["global_grad_norm"]  # restored
    assert second.diagnosis is not None and second.diagnosis.coverage.steps == 6
    assert second.diagnosis.coverage.last_step == 5
