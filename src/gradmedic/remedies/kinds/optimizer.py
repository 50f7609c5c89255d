"""Remedies that change the optimizer: its step size, its kind, its weight decay (K6, R5)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.findings import Remedy
from gradmedic.remedies.base import NotApplicable, RemedyKind, TrainSettings, lr_target

#: Optimizers whose per-parameter step already adapts to the gradient's scale.
_ADAPTIVE = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adadelta")
)
_SCALE = "for g in optimizer.param_groups: g['lr'] *= {factor:g}"


class LowerLR(RemedyKind):
    """Scale the learning rate down (``lower_lr``)."""

    name, stage, group, where = "lower_lr", 11, "lr", "optimizer"
    default_args = ((0.1,),)
    summary = "scale the learning rate down"

    def remedy(
        self,
        factor: float = 0.1,
        why: str = "",
        *,
        optimizer: bool = True,
        lr: list[float] | None = None,
    ) -> Remedy:
        """Scale the learning rate by ``factor``.

        Args:
            factor: The factor.
            why: The reason.
            optimizer: False for a loop without an optimizer: the call then scales
                the loop's own ``lr`` variable.
            lr: The current learning rate(s), to name the new value.
        """
        target, params = lr_target(factor, lr)
        text = f"Lower the learning rate {1 / factor:.3g}x{target}"
        if optimizer:
            call = _SCALE.format(factor=factor)
        else:
            text += " (no optimizer was given to the monitor: scale the lr your update uses)"
            call = f"lr = lr * {factor:g}  # the lr of your update, e.g. p -= lr * p.grad"
        return self.build(text, why, call, **params)

    def configure(self, settings: TrainSettings, remedy: Remedy) -> TrainSettings:
        """Settings whose lr factor is multiplied by ``factor``."""
        factor = float(remedy.params.get("factor", 0.1))
        return dataclasses.replace(settings, lr_factor=settings.lr_factor * factor)


class RaiseLR(RemedyKind):
    """Scale the learning rate up: steps too small to learn in (``raise_lr``)."""

    name, stage, group, where = "raise_lr", 11, "lr", "optimizer"
    summary = "scale the learning rate up (steps too small to learn in)"

    def remedy(self, factor: float, why: str = "", *, lr: list[float] | None = None) -> Remedy:
        """Scale the learning rate up by ``factor`` (> 1).

        Args:
            factor: The factor (> 1).
            why: The reason.
            lr: The current learning rate(s), to name the new value.
        """
        target, params = lr_target(factor, lr)
        text = f"Raise the learning rate {factor:.3g}x{target}"
        return self.build(text, why, _SCALE.format(factor=factor), **params)

    def configure(self, settings: TrainSettings, remedy: Remedy) -> TrainSettings:
        """Settings whose lr factor is multiplied by ``factor`` (> 1)."""
        factor = float(remedy.params["factor"])
        if not factor > 1:
            raise GradmedicError(f"raise_lr needs a factor > 1, got {factor:g}")
        return dataclasses.replace(settings, lr_factor=settings.lr_factor * factor)


class Warmup(RemedyKind):
    """Ramp the learning rate up linearly over the first steps (``warmup``)."""

    name, stage, group, where = "warmup", 12, "warmup", "optimizer"
    summary = "ramp the learning rate up linearly over the first steps"

    def remedy(
        self, start_factor: float, steps: int, why: str = "", *, optimizer: bool = True
    ) -> Remedy:
        """Ramp the learning rate linearly from ``start_factor * lr`` to ``lr`` over ``steps``."""
        text = f"Warm the learning rate up from {start_factor:g}x to 1x over {steps} steps"
        if optimizer:
            call = (
                "scheduler = torch.optim.lr_scheduler.LinearLR("
                f"optimizer, start_factor={start_factor:g}, total_iters={steps})"
                "  # and scheduler.step() after each optimizer.step()"
            )
        else:
            ramp = f"{start_factor:g} + (1 - {start_factor:g}) * step / {steps}"
            call = f"lr_now = lr * min(1.0, {ramp})  # use lr_now in your update at each step"
        return self.build(text, why, call, start_factor=float(start_factor), steps=int(steps))

    def configure(self, settings: TrainSettings, remedy: Remedy) -> TrainSettings:
        """Settings with the warm-up ramp."""
        start, steps = float(remedy.params["start_factor"]), int(remedy.params["steps"])
        return dataclasses.replace(settings, warmup=(start, steps))


class AdaptiveOptimizer(RemedyKind):
    """Switch to Adam, whose per-parameter step adapts to the gradient scale."""

    name, stage, group, where = "adaptive_optimizer", 10, "optimizer", "optimizer"
    default_args = ((),)
    summary = "switch to Adam (lr 1e-3), whose step adapts to the gradient scale"

    def remedy(self, why: str = "", *, current: str | None = None) -> Remedy:
        """Switch to Adam; ``current`` names the optimizer it replaces ("none": a manual loop)."""
        instead = ""
        if current == "none":
            instead = " instead of the manual update (then call optimizer.step())"
        elif current:
            instead = f" instead of {current}"
        return self.build(
            f"Use an adaptive optimizer (Adam, lr=1e-3){instead}",
            why,
            "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
            optimizer="Adam",
            lr=1e-3,
        )

    def check(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Not for a run that already uses an adaptive optimizer (its lr is the knob)."""
        super().check(model, optimizer)
        if isinstance(optimizer, _ADAPTIVE):
            raise NotApplicable(
                f"adaptive_optimizer: the run already uses {type(optimizer).__name__}; "
                "lower its learning rate instead"
            )

    def configure(self, settings: TrainSettings, remedy: Remedy) -> TrainSettings:
        """Settings that replace the optimizer by Adam."""
        return dataclasses.replace(settings, adam_lr=float(remedy.params.get("lr", 1e-3)))


class WeightDecay(RemedyKind):
    """Add L2 weight decay to the optimizer's weights (``weight_decay``)."""

    name, stage, group, where = "weight_decay", 12, "weight_decay", "optimizer"
    setting, default_args = ("weight_decay", "weight_decay"), ((1e-4,),)
    summary = "add L2 weight decay to the weights (norms and biases excluded)"
    text = "Add L2 weight decay {weight_decay:g} (norms and biases excluded)"
    call = "gradmedic.add_weight_decay(optimizer, model, weight_decay={weight_decay:g})"

    def remedy(self, amount: float = 1e-4, why: str = "") -> Remedy:
        """Add L2 weight decay to the optimizer's weight parameters."""
        return self.make(why, weight_decay=float(amount))
