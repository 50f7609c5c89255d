"""Hugging Face ``Trainer`` callback: ``Trainer(..., callbacks=[GradmedicTrainerCallback()])``.

Records just before each optimizer step (after the Trainer's own
``max_grad_norm`` clipping). At the end of training the diagnosis is in
``callback.diagnosis``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradmedic.integrations._session import MonitorSession, SessionCallback


class GradmedicTrainerCallback(SessionCallback, TrainerCallback):
    """Record gradient flow during ``Trainer.train``; diagnose at the end.

    Args:
        **watch_kwargs: Options of :func:`gradmedic.watch` (``every``, ``sink``, ...).
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        self.session = MonitorSession(**watch_kwargs)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Attach to the model and the optimizer the Trainer built."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("gradmedic: the Trainer passed no model/optimizer to on_train_begin")
        self.session.start(model, optimizer)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Diagnose and detach."""
        self.session.stop()
