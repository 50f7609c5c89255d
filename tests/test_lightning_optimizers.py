"""Lightning with several optimizers (a GAN, manual optimization): one callback per part."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradmedic.integrations.lightning import GradmedicCallback  # noqa: E402


class GAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        self.disc = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.losses: dict[str, list[float]] = {"g": [], "d": []}

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        real = torch.randn(x.shape[0], 2)
        fake = self.gen(x)
        opt_d.zero_grad()
        loss_d = (
            nn.functional.softplus(-self.disc(real)).mean()
            + nn.functional.softplus(self.disc(fake.detach())).mean()
        )
        self.manual_backward(loss_d)
        opt_d.step()
        opt_g.zero_grad()
        loss_g = nn.functional.softplus(-self.disc(fake)).mean()  # fills disc's .grad too
        self.manual_backward(loss_g)
        opt_g.step()
        self.losses["d"].append(loss_d.item())
        self.losses["g"].append(loss_g.item())

    def configure_optimizers(self):
        return [
            torch.optim.Adam(self.gen.parameters(), lr=1e-3),
            torch.optim.Adam(self.disc.parameters(), lr=1e-3),
        ]


def fit(callbacks: list, tmp_path) -> GAN:
    torch.manual_seed(0)
    module = GAN()
    data = torch.utils.data.TensorDataset(torch.randn(64, 8))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    return module


def test_one_callback_per_optimizer_watches_its_part_with_its_loss(tmp_path) -> None:
    gen_cb, disc_cb = (
        GradmedicCallback(optimizer=0, show=False),
        GradmedicCallback(optimizer=1, show=False),
    )
    module = fit([gen_cb, disc_cb], tmp_path)
    gen_rows, disc_rows = gen_cb.session.previous, disc_cb.session.previous
    assert set(gen_rows[0]["grad_norm"]) == {"0", "2"}  # the generator's own layers
    assert set(disc_rows[0]["grad_norm"]) == {"0", "2"}
    assert [r["step"] for r in disc_rows] == [0, 1, 2, 3]  # 4 batches, no skipped steps
    assert not any(r.get("skipped") for r in gen_rows + disc_rows)
    assert all(v > 0 for r in disc_rows for v in r["update_ratio"].values())
    # manual optimization: the loss given to manual_backward before each step
    assert [r["loss"] for r in disc_rows] == pytest.approx(module.losses["d"], rel=1e-6)
    assert [r["loss"] for r in gen_rows] == pytest.approx(module.losses["g"], rel=1e-6)


def test_several_optimizers_and_no_choice_warn_and_watch_the_first_part(tmp_path) -> None:
    callback = GradmedicCallback(show=False)
    with pytest.warns(UserWarning, match="2 optimizers; this callback watches 'gen'"):
        fit([callback], tmp_path)
    assert set(callback.session.previous[0]["grad_norm"]) == {"0", "2"}


def test_a_bad_optimizer_index_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer's index"):
        GradmedicCallback(optimizer=-1)
