"""Remedies for half precision: scale the loss so float16 gradients do not underflow."""

from __future__ import annotations

import torch
from torch import nn

from gradmedic.findings import Remedy
from gradmedic.remedies.base import NotApplicable, RemedyKind


class LossScaling(RemedyKind):
    """Scale the loss with ``torch.amp.GradScaler`` (``loss_scaling``).

    float16's smallest positive value is 6e-8: a gradient below it is 0. The
    scaler multiplies the loss (so every gradient) by up to 2^16 before the
    backward pass and divides the gradients back before the step, skipping the
    steps whose scaled gradients overflow.
    """

    name, stage, group, where = "loss_scaling", 13, "precision", "setup"
    summary = "scale the loss (torch.amp.GradScaler) so float16 gradients do not underflow"

    def remedy(self, why: str = "", *, device: str = "cuda") -> Remedy:
        """Use a GradScaler around ``backward()`` and ``step()``, or autocast to bfloat16."""
        return self.build(
            f"Scale the loss with torch.amp.GradScaler({device!r}): "
            "scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update() "
            "(or autocast to torch.bfloat16, which has float32's range)",
            why,
            f"scaler = torch.amp.GradScaler({device!r})",
            device=device,
        )

    def check(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Never in the repair search: it retrains in float32, where nothing underflows."""
        raise NotApplicable(
            "loss_scaling: the repair retrains in float32, where no gradient underflows; "
            "apply it in the float16 run"
        )
