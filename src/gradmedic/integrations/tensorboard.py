"""TensorBoard through ``torch.utils.tensorboard`` (``pip install 'gradmedic[tensorboard]'``).

Writes the series of :mod:`gradmedic.integrations.series` (tags
``gradmedic/<statistic>/<layer>``) and, as findings open, a
``gradmedic/finding/<problem>`` point at the onset step and a text line.

Example:
    >>> import tempfile, torch, gradmedic
    >>> from gradmedic.integrations.tensorboard import TensorBoardWriter
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> tb = TensorBoardWriter(tempfile.mkdtemp())
    >>> with gradmedic.watch(model, opt) as monitor:
    ...     for _ in range(3):
    ...         opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    ...         tb.log(monitor)
    >>> tb.close()
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.integrations.series import OpenedFindings, scalars
from gradmedic.monitor import Monitor

#: Look for newly opened findings every this many records (a diagnosis of the history).
FINDINGS_EVERY = 100


class TensorBoardWriter:
    """Write a monitor's records to TensorBoard.

    Args:
        log_dir: The event-file folder, or a ``SummaryWriter`` to write through.
        per_layer: Also a series per layer (gradient norm, delta, update ratio).
        findings_every: Diagnose the history every this many records to log
            findings as they open (0: only at :meth:`close` via :meth:`findings`).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | Any,
        *,
        per_layer: bool = False,
        findings_every: int = FINDINGS_EVERY,
    ) -> None:
        if isinstance(log_dir, str | os.PathLike):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise ImportError(
                    "TensorBoard logging needs the tensorboard package: "
                    "pip install 'gradmedic[tensorboard]'"
                ) from exc
            self.writer = SummaryWriter(log_dir=os.fspath(log_dir))
            self._owned = True
        else:
            self.writer = log_dir
            self._owned = False
        self.per_layer = per_layer
        self.findings_every = findings_every
        self._opened = OpenedFindings()
        self._count = 0

    def write(self, row: Mapping[str, Any], layers: Sequence[str]) -> None:
        """Write one record's series at its step."""
        step = int(row.get("step", 0))
        for tag, value in scalars(row, layers, per_layer=self.per_layer).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log(self, monitor: Monitor) -> None:
        """Write the monitor's newest record, if it is the step just taken."""
        row = monitor.history.last()
        if row is not None and row["step"] == monitor.steps - 1:
            self._written(monitor, row)

    def on_record(self, watched: Any, row: Mapping[str, Any]) -> None:
        """Consumer for :class:`gradmedic.autoattach.AutoAttach` (``gradmedic run``)."""
        self._written(watched.monitor, row)

    def findings(self, monitor: Monitor) -> None:
        """Diagnose the history; log each problem that opened since the last look."""
        diagnosis = monitor.diagnose()
        for tag, onset, line in self._opened.new(diagnosis):
            step = onset if onset is not None else monitor.steps
            self.writer.add_scalar(tag, 1.0, global_step=step)
            self.writer.add_text("gradmedic/findings", line, global_step=step)

    def close(self) -> None:
        """Flush; close the writer if this object opened it."""
        self.writer.flush()
        if self._owned:
            self.writer.close()

    def _written(self, monitor: Monitor, row: Mapping[str, Any]) -> None:
        self.write(row, monitor.layers)
        self._count += 1
        if self.findings_every and self._count % self.findings_every == 0:
            self.findings(monitor)
