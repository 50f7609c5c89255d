"""Hugging Face ``Trainer`` callback: ``Trainer(..., callbacks=[GradmedicTrainerCallback()])``.

Records just before each optimizer step (after the Trainer's own
``max_grad_norm`` clipping), with the loss the model returned. At every
``logging_steps`` it adds its summary series (``gradmedic/<statistic>/<layer>``)
to the Trainer's logs, so every ``report_to`` backend gets them: the callback
moves itself ahead of the reporting callbacks. At the end of training the
diagnosis is printed, saved as ``gradmedic-diagnosis.json`` in ``output_dir``
and kept in ``callback.diagnosis``.

Each checkpoint the Trainer saves gets the records so far
(``checkpoint-<step>/gradmedic-state.json``); ``trainer.train(resume_from_checkpoint=...)``
from a checkpoint in ``output_dir`` restores them, so a resumed run is diagnosed as a
whole, its steps continuing the saved ones.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradmedic.integrations._session import MonitorSession, SessionCallback

STATE_FILE = "gradmedic-state.json"


class GradmedicTrainerCallback(SessionCallback, TrainerCallback):
    """Record gradient flow during ``Trainer.train``; add it to the logs; diagnose at the end.

    Args:
        per_layer: Log a series per layer too, not only the summary.
        show: Print the diagnosis at the end of training (main process).
        **watch_kwargs: Options of :func:`gradmedic.watch` (``every``, ``sink``, ...).
    """

    def __init__(self, *, per_layer: bool = False, show: bool = True, **watch_kwargs: Any) -> None:
        self.session = MonitorSession(per_layer=per_layer, **watch_kwargs)
        self.show = show

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Move ahead of the reporting callbacks, so they see the series added in ``on_log``."""
        _move_first(self)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Attach to the model and the optimizer the Trainer built."""
        _move_first(self)
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("gradmedic: the Trainer passed no model/optimizer to on_train_begin")
        if not self.session.previous:
            self.session.offset = state.global_step
            if state.global_step:  # resumed: the records saved with that checkpoint
                self._restore(_checkpoint(args, state) / STATE_FILE)
        self.session.start(model, optimizer)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Save the records so far in the checkpoint the Trainer just wrote."""
        folder = _checkpoint(args, state)
        if not state.is_world_process_zero or not folder.is_dir():
            return
        try:
            (folder / STATE_FILE).write_text(json.dumps(self.session.state_dict()))
        except Exception as exc:  # a failed save of gradmedic's records never stops training
            warnings.warn(f"gradmedic: records not saved in {folder}: {exc!r}",
                          RuntimeWarning, stacklevel=2)  # fmt: skip

    def _restore(self, path: Path) -> None:
        if not path.is_file():
            return  # a checkpoint from elsewhere, or saved without this callback
        try:
            self.session.load_state_dict(json.loads(path.read_text()))
        except Exception as exc:  # unreadable: diagnose the resumed part alone
            warnings.warn(f"gradmedic: records in {path} not restored: {exc!r}",
                          RuntimeWarning, stacklevel=2)  # fmt: skip

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Add the newest record's series to ``logs`` and to the state's ``log_history``.

        The Trainer appends a copy of ``logs`` to ``state.log_history`` before its
        callbacks see them: the series go into that entry too (``trainer_state.json``).
        """
        if logs is not None and "loss" in logs:  # a training log, not an evaluation one
            series = self.session.series()
            logs.update(series)
            history = getattr(state, "log_history", None)
            last = history[-1] if history else None
            if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
                last.update(series)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Diagnose and detach; print and save the diagnosis."""
        self.session.stop()
        if state.is_world_process_zero:
            self.session.finish(args.output_dir, show=self.show)


def _checkpoint(args: TrainingArguments, state: TrainerState) -> Path:
    """The folder of the Trainer's checkpoint at the current step."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def _move_first(callback: Any) -> None:
    """Put ``callback`` first in the CallbackHandler that is calling it (found on the stack)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(4):
        if frame is None:
            return
        handler = frame.f_locals.get("self")
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and callback in callbacks:
            if callbacks[0] is not callback:
                callbacks.remove(callback)
                callbacks.insert(0, callback)
            return
        frame = frame.f_back
