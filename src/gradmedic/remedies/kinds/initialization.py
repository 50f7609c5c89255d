"""Remedies that re-initialize weights or biases in place (claims R3, R4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic.findings import Remedy
from gradmedic.remedies import init
from gradmedic.remedies.base import RemedyKind

SCHEMES = ("he", "xavier", "orthogonal", "lecun", "lsuv", "residual_zero")
_TEXT = {
    "he": "He (Kaiming) initialization: variance 2/fan_in keeps ReLU signals at constant size",
    "xavier": "Xavier (Glorot) initialization: variance 2/(fan_in+fan_out), for tanh",
    "orthogonal": "Orthogonal initialization: singular values 1, the Jacobian preserves norms",
    "lecun": "LeCun initialization: variance 1/fan_in",
    "lsuv": "LSUV: data-driven init scaling each layer until its output variance is 1",
    "residual_zero": "Zero-initialize the last layer of every residual block (SkipInit)",
}


class InitScheme(RemedyKind):
    """Re-initialize every weight with one scheme (``<scheme>_init``)."""

    name, pattern, default_args = "init_scheme", r"\w+_init", tuple((s,) for s in SCHEMES)
    stage, group, where = 4, "init", "model"
    summary = "re-initialize the weights: He, Xavier, orthogonal, LeCun, LSUV or residual zero"

    def remedy(self, scheme: str, why: str = "") -> Remedy:
        """Re-initialize weights with ``scheme`` ('he', 'xavier', 'orthogonal', 'lecun', 'lsuv')."""
        call = (
            "gradmedic.init.apply(model, 'lsuv', data=batch)"
            if scheme == "lsuv"
            else f"gradmedic.init.apply(model, {scheme!r})"
        )
        text = _TEXT.get(scheme, f"{scheme} initialization")
        return self.build(text, why, call, f"{scheme}_init", scheme=scheme)

    def defaults(self, model: nn.Module) -> list[Remedy]:
        """Every scheme, ``residual_zero`` only for a model with residual blocks."""
        ends = init.residual_branch_ends(model)
        return [self.remedy(s) for (s,) in self.default_args if s != "residual_zero" or ends]

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """``model``, re-initialized in place (LSUV scales on ``batch``)."""
        scheme = remedy.params["scheme"]
        kwargs: dict[str, Any] = {"data": batch} if scheme == "lsuv" else {}
        init.apply(model, scheme, **kwargs)
        return model


class BiasReinit(RemedyKind):
    """Reset the biases feeding dead units to a small positive value (``bias_reinit``)."""

    name, stage, group, where = "bias_reinit", 6, "bias", "model"
    summary, default_args = (
        "reset the biases feeding dead units to a small positive value",
        ((0.01,),),
    )
    text = "Re-initialize the biases feeding dead units to {value:g}"
    call = "gradmedic.init.apply(model, 'bias', value={value:g})"

    def remedy(self, value: float = 0.01, why: str = "") -> Remedy:
        """Reset the biases of layers feeding dead units to a small positive value."""
        return self.make(why, value=float(value))

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """``model`` with its biases reset in place."""
        init.apply(model, "bias", value=remedy.params.get("value", 0.01))
        return model
