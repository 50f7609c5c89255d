"""Remedies that change the model's structure (claims R1, R2, R6): new modules, a new model."""

from __future__ import annotations

import torch
from torch import nn

from gradmedic.findings import Remedy
from gradmedic.remedies import surgery
from gradmedic.remedies.base import RemedyKind, nn_class

ACTIVATIONS = ("Sigmoid", "Tanh", "ReLU", "LeakyReLU", "ELU")
_REPLACEMENTS = ("ReLU", "LeakyReLU", "ELU")


class SwapActivation(RemedyKind):
    """Replace activation modules of one class by another (``swap_<new>``)."""

    name, pattern = "swap_activation", r"swap_\w+"
    stage, group, where, assigns = 1, "activation", "model", True
    summary = "replace an activation (Sigmoid, Tanh) by a non-saturating one"

    def remedy(self, old: str, new: str, why: str = "") -> Remedy:
        """Replace activation modules ``old`` by ``new`` (class names in ``torch.nn``)."""
        call = f"model = gradmedic.surgery.swap_activations(model, {{nn.{old}: nn.{new}}})"
        text = f"Replace {old} by {new}"
        return self.build(text, why, call, f"swap_{new.lower()}", mapping={old: new})

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """A copy of ``model`` with the swapped activations."""
        mapping: dict[type[nn.Module] | str, type[nn.Module] | str] = {
            nn_class(o): nn_class(n) for o, n in dict(remedy.params["mapping"]).items()
        }
        return surgery.swap_activations(model, mapping)

    def defaults(self, model: nn.Module) -> list[Remedy]:
        """Each activation present -> each of ReLU, LeakyReLU, ELU it is not."""
        present = {type(m).__name__ for m in model.modules()}
        olds = [old for old in ACTIVATIONS if old in present]
        return [self.remedy(old, new) for old in olds for new in _REPLACEMENTS if new != old]


class Normalization(RemedyKind):
    """Insert BatchNorm or LayerNorm after each Linear/Conv (``batch_norm``, ``layer_norm``)."""

    name, pattern, default_args = "normalization", r"(batch|layer)_norm", (("batch",), ("layer",))
    stage, group, where, assigns = 3, "normalization", "model", True
    summary = "insert batch or layer normalization after each Linear/Conv"
    text = "Insert {kind} normalization after each Linear/Conv layer"
    call = "model = gradmedic.surgery.add_normalization(model, kind={kind!r})"

    def remedy(self, kind: str = "batch", why: str = "") -> Remedy:
        """Insert BatchNorm/LayerNorm after each Linear/Conv."""
        return self.make(why, f"{kind}_norm", kind=kind)

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """A copy of ``model`` with the normalization layers."""
        return surgery.add_normalization(model, kind=remedy.params.get("kind", "batch"))


class Residual(RemedyKind):
    """Wrap shape-preserving blocks in identity skip connections (``residual``)."""

    name, stage, group, where, assigns = "residual", 2, "residual", "model", True
    summary, default_args = "identity skip connections around shape-preserving blocks", ((),)
    text = "Add residual (identity) connections around shape-preserving blocks"
    call = "model = gradmedic.surgery.residualize(model)"

    def remedy(self, why: str = "") -> Remedy:
        """Wrap shape-preserving blocks in identity skip connections."""
        return self.make(why)

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """A copy of ``model`` with the skip connections."""
        return surgery.residualize(model)
