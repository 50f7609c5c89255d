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

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from gradmedic.integrations._session import MonitorSession, SessionCallback


class GradmedicCallback(SessionCallback, Callback):
    """Record gradient flow during ``Trainer.fit``; log it; diagnose at the end.

    Args:
        per_layer: Log a series per layer too, not only the summary.
        show: Print the diagnosis at the end of fit (global rank 0).
        **watch_kwargs: Options of :func:`gradmedic.watch` (``every``, ``sink``, ...).
    """

    def __init__(self, *, per_layer: bool = False, show: bool = True, **watch_kwargs: Any) -> None:
        super().__init__()
        self.session = MonitorSession(per_layer=per_layer, **watch_kwargs)
        self.show = show

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach to the module and its (first) optimizer."""
        self.session.start(pl_module, trainer.optimizers[0])

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
