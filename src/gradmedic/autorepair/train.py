"""The training harness: one short, seeded, monitored training run of a candidate.

Every candidate of the repair search, and the user's original setup, is trained
by :func:`train` with the same budget and seed: a fresh model from the factory,
the candidate's model remedies, an optimizer built after them, then
``budget.steps`` optimizer steps under :func:`gradmedic.watch`, the monitor's
diagnosis, and the validation loss and metric.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmedic.autorepair.appliers import TrainSettings, apply_model, settings_for
from gradmedic.autorepair.problem import Budget, Setup, train_batches, val_batches
from gradmedic.autorepair.truncate import truncated_bptt
from gradmedic.findings import Diagnosis, Remedy
from gradmedic.layers import has_recurrent


@dataclass
class TrainOutcome:
    """What one training run produced.

    Attributes:
        model: The trained model.
        diagnosis: The monitor's diagnosis of the run.
        metric: The setup's metric on the validation data (NaN if it failed).
        val_loss: The loss on the validation data.
        steps: Optimizer steps taken.
        seconds: Wall time of the run (building, training, evaluating).
        diverged: The training loss became NaN or infinite (training stopped there).
        settings: The training-loop settings used.
        losses: The training loss at every step.
    """

    model: nn.Module
    diagnosis: Diagnosis
    metric: float
    val_loss: float
    steps: int
    seconds: float
    diverged: bool
    settings: TrainSettings
    losses: list[float]

    @property
    def progress(self) -> float:
        """Mean training loss over the last tenth of the steps over the first tenth.

        Below 1 the model learned; NaN when the run diverged or was too short.
        """
        k = len(self.losses) // 10
        if self.diverged or k == 0:
            return math.nan
        first, last = sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k
        return last / first if first > 0 else math.nan


def first_batch(setup: Setup, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch of a run with this seed."""
    return next(train_batches(setup.data[0], setup.batch_size, torch.Generator().manual_seed(seed)))


def build(setup: Setup, remedies: Sequence[Remedy], batch: torch.Tensor, seed: int) -> nn.Module:
    """A fresh model (seeded) with the model remedies applied."""
    torch.manual_seed(seed)
    return apply_model(setup.fresh_model(), remedies, batch)


def preflight(setup: Setup, remedies: Sequence[Remedy] = (), *, seed: int = 0) -> Diagnosis:
    """The diagnosis of the model a run would start from: :func:`gradmedic.check`.

    What is wrong at initialization (the structure and the weights, not the
    training dynamics), on the run's first batch with the setup's loss; no
    optimizer step is taken.
    """
    from gradmedic.preflight import check

    x, y = first_batch(setup, seed)
    model = build(setup, remedies, x, seed)
    return check(model, x, y, setup.loss_fn)


def _probes(model: nn.Module) -> dict[str, Any]:
    """The optional probes a run of ``model`` uses."""
    return {"activations": True, "recurrent": has_recurrent(model)}


def make_optimizer(
    setup: Setup, model: nn.Module, settings: TrainSettings
) -> torch.optim.Optimizer:
    """The user's optimizer (or Adam) for ``model``, with the settings' lr and decay."""
    optimizer: torch.optim.Optimizer
    if settings.adam_lr is not None:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.adam_lr)
    else:
        optimizer = setup.make_optimizer(model.parameters())
    if settings.lr_factor != 1.0:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * settings.lr_factor
    if settings.weight_decay is not None:
        from gradmedic.remedies.weight_decay import add_weight_decay

        out = add_weight_decay(optimizer, model, weight_decay=settings.weight_decay)
        optimizer = out if isinstance(out, torch.optim.Optimizer) else optimizer
    return optimizer


class _Clipper:
    """The settings' clipping, called between ``backward()`` and ``step()``."""

    def __init__(self, settings: TrainSettings) -> None:
        from gradmedic.remedies import clipping

        self.settings = settings
        self.clipping = clipping
        self.auto = (
            clipping.AutoClip(percentile=settings.autoclip)
            if settings.autoclip is not None
            else None
        )

    def __call__(self, model: nn.Module) -> None:
        s = self.settings
        if s.clip_norm is not None:
            self.clipping.clip_grad_norm_(model.parameters(), max_norm=s.clip_norm)
        if s.clip_value is not None:
            self.clipping.clip_grad_value_(model.parameters(), clip_value=s.clip_value)
        if self.auto is not None:
            self.auto(model.parameters())


def evaluate(setup: Setup, model: nn.Module) -> tuple[float, float]:
    """``(val_loss, metric)`` on the whole validation data (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for x, y in val_batches(setup.data[1], setup.batch_size):
            outputs.append(model(x))
            targets.append(y)
    model.train(was_training)
    out, y = torch.cat(outputs), torch.cat(targets)
    val_loss = float(setup.loss_fn(out, y))
    if not torch.isfinite(out).all():
        return val_loss, math.nan
    return val_loss, float(setup.resolved_metric.fn(out, y))


def train(
    setup: Setup,
    remedies: Sequence[Remedy] = (),
    *,
    budget: Budget,
    seed: int = 0,
    horizon: int | None = None,
) -> TrainOutcome:
    """Train ``setup`` with ``remedies`` applied, for ``budget.steps`` steps, under a monitor.

    Deterministic for a given seed: the model is built after ``torch.manual_seed(seed)``
    and batches come from a generator seeded with ``seed``, so the same call gives
    the same numbers (unless ``budget.seconds`` cuts the run).

    Args:
        setup: The user's setup.
        remedies: Remedies to apply (model remedies first, then training settings).
        budget: Steps and wall-time cap.
        seed: Random seed.
        horizon: The length of run the remedies' schedules are sized for; a shorter
            run compresses its warmup by ``budget.steps / horizon``, so a short run of
            successive halving sees the schedule of the full run, scaled.

    Returns:
        The trained model, its diagnosis, validation loss and metric.
    """
    from gradmedic.monitor import watch

    start = time.perf_counter()
    batches = train_batches(setup.data[0], setup.batch_size, torch.Generator().manual_seed(seed))
    first = next(batches)
    batches = itertools.chain([first], batches)
    model = build(setup, remedies, first[0], seed)
    model.train()
    settings = settings_for(remedies)
    optimizer = make_optimizer(setup, model, settings)
    clip = _Clipper(settings)
    scheduler = None
    if settings.warmup is not None:
        start_factor, warm = settings.warmup
        if horizon is not None and budget.steps < horizon:
            warm = max(1, round(warm * budget.steps / horizon))
        scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=start_factor, total_iters=warm
        )
    steps, diverged, losses = 0, False, []
    with (
        truncated_bptt(model, settings.truncate_bptt),
        watch(model, optimizer, **_probes(model)) as monitor,
    ):
        while steps < budget.steps and time.perf_counter() - start < budget.seconds:
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = setup.loss_fn(model(x), y)
            monitor.note_loss(loss)
            loss.backward()
            clip(model)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            steps += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                diverged = True  # recorded once, so the diagnosis sees it; then stop
                break
        diagnosis = monitor.diagnose()
    val_loss, metric = evaluate(setup, model)
    return TrainOutcome(
        model=model,
        diagnosis=diagnosis,
        metric=metric,
        val_loss=val_loss,
        steps=steps,
        seconds=time.perf_counter() - start,
        diverged=diverged,
        settings=settings,
        losses=losses,
    )
