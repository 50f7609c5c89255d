"""What both framework callbacks share: start a monitor, keep its diagnosis at the end."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic.findings import Diagnosis
from gradmedic.monitor import Monitor, watch


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Unwrap optimizer wrappers (accelerate's AcceleratedOptimizer, LightningOptimizer).

    Step hooks fire only on the optimizer whose ``step`` really runs.
    """
    seen = 0
    while not _is_plain_optimizer(optimizer) and hasattr(optimizer, "optimizer") and seen < 5:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cannot find a torch.optim.Optimizer inside {type(optimizer).__name__}")
    return optimizer


def _is_plain_optimizer(optimizer: Any) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer")


class MonitorSession:
    """A monitor started and stopped by a framework's callback events."""

    def __init__(self, **watch_kwargs: Any) -> None:
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self.diagnosis: Diagnosis | None = None

    def start(self, model: nn.Module, optimizer: Any) -> None:
        """Attach a monitor (replacing one left from an earlier fit)."""
        self.stop()
        self.monitor = watch(model, innermost_optimizer(optimizer), **self.watch_kwargs)

    def stop(self) -> None:
        """Diagnose what was recorded, then remove every hook."""
        if self.monitor is None:
            return
        try:
            self.diagnosis = self.monitor.diagnose()
        finally:
            self.monitor.close()
            self.monitor = None


class SessionCallback:
    """Mixin for framework callbacks that own a :class:`MonitorSession` as ``self.session``."""

    session: MonitorSession

    @property
    def monitor(self) -> Monitor | None:
        """The live monitor while training runs, else None."""
        return self.session.monitor

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The diagnosis of the last training run, or None."""
        return self.session.diagnosis
