"""Lightning callback: ``Trainer(callbacks=[GradmedicCallback()])``.

The monitor hooks the optimizer's step, so it records after Lightning's own
gradient clipping, exactly what the optimizer uses. At the end of ``fit`` the
diagnosis is in ``callback.diagnosis``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from gradmedic.integrations._session import MonitorSession, SessionCallback


class GradmedicCallback(SessionCallback, Callback):
    """Record gradient flow during ``Trainer.fit``; diagnose at the end.

    Args:
        **watch_kwargs: Options of :func:`gradmedic.watch` (``every``, ``sink``, ...).
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        super().__init__()
        self.session = MonitorSession(**watch_kwargs)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach to the module and its (first) optimizer."""
        self.session.start(pl_module, trainer.optimizers[0])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Diagnose and detach."""
        self.session.stop()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Detach even when training fails (the records stay in the sink)."""
        self.session.stop()
