"""Lightning callback: ``Trainer(callbacks=[GradmedicCallback()])``.

The monitor hooks the optimizer's step, so it records after Lightning's own
gradient clipping, exactly what the optimizer uses, and the loss the training
step returned. Every ``log_every_n_steps`` the summary series (tags
``gradmedic/<statistic>/<layer>``, see :mod:`gradmedic.integrations.series`)
go to every logger of the trainer (``trainer.loggers``: TensorBoard, CSV,
W&B, ...). At the end of ``fit`` the diagnosis is printed, saved as
``gradmedic-diagnosis.json`` in the trainer's log folder and kept in
``callback.diagnosis``. The records are in the checkpoint
(``state_dict``), so a resumed run is diagnosed as a whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from gradmedic.integrations._session import (
    MonitorSession,
    SessionCallback,
    innermost_optimizer,
    stepped_module,
)


class GradmedicCallback(SessionCallback, Callback):
    """Record gradient flow during ``Trainer.fit``; log it; diagnose at the end.

    With several optimizers (a GAN), one callback watches the part of the module one
    optimizer steps (``optimizer``: its index in ``trainer.optimizers``); add one
    callback per optimizer to watch each part.

    Args:
        optimizer: Index of the optimizer to watch (None: the first, with a warning
            when there are several).
        per_layer: Log a series per layer too, not only the summary.
        show: Print the diagnosis at the end of fit (global rank 0).
        **watch_kwargs: Options of :func:`gradmedic.watch` (``every``, ``sink``, ...).
    """

    def __init__(
        self,
        *,
        optimizer: int | None = None,
        per_layer: bool = False,
        show: bool = True,
        **watch_kwargs: Any,
    ) -> None:
        super().__init__()
        if optimizer is not None and (
            isinstance(optimizer, bool) or not isinstance(optimizer, int) or optimizer < 0
        ):
            raise ValueError(
                f"optimizer must be an optimizer's index (an int >= 0), got {optimizer!r}"
            )
        self.optimizer = optimizer
        self.session = MonitorSession(per_layer=per_layer, **watch_kwargs)
        self.show = show

    @property
    def state_key(self) -> str:
        """One checkpoint entry per watched optimizer."""
        return self._generate_state_key(optimizer=self.optimizer or 0)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach to the part of the module the chosen optimizer steps, and to it."""
        optimizers = trainer.optimizers
        index = self.optimizer or 0
        if index >= len(optimizers):
            warnings.warn(
                f"gradmedic: GradmedicCallback(optimizer={index}) but the trainer has "
                f"{len(optimizers)} optimizer(s); nothing is watched",
                stacklevel=2,
            )
            return
        optimizer = innermost_optimizer(optimizers[index])
        part = stepped_module(pl_module, optimizer) if len(optimizers) > 1 else ("", pl_module)
        if len(optimizers) > 1 and self.optimizer is None:
            where = f"'{part[0]}'" if part[0] else "the whole module"
            warnings.warn(
                f"gradmedic: {len(optimizers)} optimizers; this callback watches {where}, "
                "which optimizer 0 steps. Add GradmedicCallback(optimizer=i) for the others.",
                stacklevel=2,
            )
        self.session.start(part[1], optimizer)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        """Manual optimization: the loss given to ``manual_backward`` is the step's loss."""
        mon = self.session.monitor
        if mon is not None and not pl_module.automatic_optimization:
            mon.note_loss(loss)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        """Send the series to the trainer's loggers every ``log_every_n_steps``."""
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
        if not trainer.loggers or (trainer.global_step - 1) % every:
            return
        metrics = self.session.series()
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step - 1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Diagnose and detach; print and save the diagnosis."""
        self.session.stop()
        if trainer.is_global_zero:
            self.session.finish(trainer.log_dir or trainer.default_root_dir, show=self.show)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Detach even when training fails (the records stay in the sink)."""
        self.session.stop()

    def state_dict(self) -> dict[str, Any]:
        """The records so far, saved in Lightning checkpoints."""
        return self.session.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the records of a checkpoint (a resumed fit)."""
        self.session.load_state_dict(state_dict)
