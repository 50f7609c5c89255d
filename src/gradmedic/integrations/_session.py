"""What both framework callbacks share: start a monitor, log its series, diagnose at the end."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmedic.findings import Diagnosis
from gradmedic.integrations.series import PREFIX, OpenedFindings, scalars
from gradmedic.monitor import Monitor, watch

#: File name of the diagnosis the callbacks save at the end of training.
DIAGNOSIS_FILE = "gradmedic-diagnosis.json"
#: Look for newly opened findings every this many logged records.
FINDINGS_EVERY = 10


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


def stepped_module(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[str, nn.Module]:
    """The smallest submodule of ``model`` holding every parameter ``optimizer`` steps.

    A GAN's module holds a generator and a discriminator, each stepped by its own
    optimizer: each is watched with its optimizer, not the whole module with one.
    ``("", model)`` when no smaller module holds them all.
    """
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not stepped:
        return "", model
    best: tuple[int, str, nn.Module] = (sum(1 for _ in model.parameters()), "", model)
    for name, module in model.named_modules():
        own = {id(p) for p in module.parameters()}
        if stepped <= own and len(own) < best[0]:
            best = (len(own), name, module)
    return best[1], best[2]


class MonitorSession:
    """A monitor started and stopped by a framework's callback events.

    Records of an earlier run (restored by :meth:`load_state_dict` from a
    checkpoint) are kept: the diagnosis at the end covers the whole run, the
    new records' steps continuing from the restored ones.
    """

    def __init__(self, per_layer: bool = False, **watch_kwargs: Any) -> None:
        self.watch_kwargs = watch_kwargs
        self.per_layer = per_layer
        self.monitor: Monitor | None = None
        self.diagnosis: Diagnosis | None = None
        self.previous: list[dict[str, Any]] = []
        self.offset = 0  # steps taken before this monitor started (a resumed run)
        self._opened = OpenedFindings()
        self._logged = 0
        self._last_step: int | None = None  # the record last returned by series()

    def start(self, model: nn.Module, optimizer: Any) -> None:
        """Attach a monitor (replacing one left from an earlier fit)."""
        self.stop()
        self._last_step = None
        self.monitor = watch(model, innermost_optimizer(optimizer), **self.watch_kwargs)

    def rows(self) -> list[dict[str, Any]]:
        """Every record of the run: restored ones, then this monitor's (steps continued)."""
        current = self.monitor.history.rows() if self.monitor is not None else []
        return self.previous + [{**r, "step": r["step"] + self.offset} for r in current]

    def series(self) -> dict[str, float]:
        """The newest record's series (tags ``gradmedic/...``) if it is the step just taken.

        Empty when that record was returned before (gradient accumulation: several
        batches end on one optimizer step).

        Every ``FINDINGS_EVERY`` calls, problems that opened since add
        ``gradmedic/finding/<problem>`` = 1.
        """
        mon = self.monitor
        if mon is None or mon.closed:
            return {}
        row = mon.history.last()
        if row is None or row["step"] != mon.steps - 1 or row["step"] == self._last_step:
            return {}  # no new record (not recorded, or already logged: accumulation)
        self._last_step = row["step"]
        out = scalars(row, mon.layers, per_layer=self.per_layer)
        self._logged += 1
        if self._logged % FINDINGS_EVERY == 0:
            for tag, _onset, _line in self._opened.new(mon.diagnose()):
                out[tag] = 1.0
        return out

    def stop(self) -> None:
        """Diagnose what was recorded (with restored records), then remove every hook."""
        mon = self.monitor
        if mon is None:
            return
        try:
            if self.previous:
                self.diagnosis = _diagnose(mon, self.rows())
            else:
                self.diagnosis = mon.diagnose()
        finally:
            self.previous = self.rows()
            self.offset += mon.steps
            mon.close()
            self.monitor = None

    def finish(self, folder: str | Path | None, *, show: bool = True) -> Path | None:
        """Print the short diagnosis (stderr) and save it as JSON in ``folder``."""
        d = self.diagnosis
        if d is None:
            return None
        if show:
            print(str(d), file=sys.stderr)
        if folder is None:
            return None
        path = Path(folder) / DIAGNOSIS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(d.to_json(), encoding="utf-8")
        return path

    def state_dict(self) -> dict[str, Any]:
        """The records so far (plain data), for a checkpoint."""
        return {
            "rows": json.loads(json.dumps(self.rows())),
            "offset": self.offset + (self.monitor.steps if self.monitor is not None else 0),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the records of a checkpoint; new records continue its steps."""
        self.previous = list(state.get("rows", []))
        self.offset = int(state.get("offset", 0))


def _diagnose(mon: Monitor, rows: list[dict[str, Any]]) -> Diagnosis:
    """``mon.diagnose()`` over ``rows`` instead of its own history."""
    from gradmedic.context import model_context
    from gradmedic.diagnose import diagnose_rows
    from gradmedic.optimizer_facts import optimizer_facts

    context = model_context(mon.model, mon.layers)
    context["optimizer"] = optimizer_facts(mon.optimizer)
    context["monitor"] = mon.coverage()
    return diagnose_rows(rows, layers=mon.layers, context=context)


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


__all__ = [
    "DIAGNOSIS_FILE",
    "PREFIX",
    "MonitorSession",
    "SessionCallback",
    "innermost_optimizer",
    "stepped_module",
]
