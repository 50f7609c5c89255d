"""The remedy vocabulary: one constructor per cure, naming the call that applies it.

Detectors build their ranked remedy lists from these, so every Finding names a
real gradmedic call with arguments that fit the model at hand, and the repair
search (:mod:`gradmedic.autorepair`) maps ``Remedy.name`` back to its kind.
Each constructor is the ``remedy`` method of a kind in
:mod:`gradmedic.remedies.registry`; a kind registered without a name here is
reached as ``catalog.get("<name>").remedy(...)``.

Every ``Remedy.call`` runs as pasted into an ordinary training script (names
``model``, ``optimizer``, ``batch``, ``torch``, ``nn``, ``gradmedic`` in scope):
calls that return a new model rebind it (``model = gradmedic.surgery...``), and
remedies for a loop without an optimizer name the loop's own learning rate.
"""

from __future__ import annotations

from typing import TypeVar

from gradmedic.errors import GradmedicError
from gradmedic.remedies.base import RemedyKind
from gradmedic.remedies.kinds import (
    clipping,
    initialization,
    optimizer,
    precision,
    recurrent,
    structure,
)
from gradmedic.remedies.registry import get, kind_of, kinds

_K = TypeVar("_K", bound=RemedyKind)

__all__ = [
    "adaptive_optimizer",
    "autoclip",
    "bias_reinit",
    "clip_norm",
    "clip_value",
    "forget_bias",
    "gate_recurrent",
    "get",
    "init_scheme",
    "kind_of",
    "kinds",
    "loss_scaling",
    "lower_lr",
    "normalization",
    "raise_lr",
    "residual",
    "swap_activation",
    "truncate_bptt",
    "warmup",
    "weight_decay",
]


def _registered(cls: type[_K]) -> _K:
    """The registered instance of ``cls`` (typed, so each constructor keeps its signature)."""
    kind = get(cls.name)
    if not isinstance(kind, cls):
        raise GradmedicError(f"remedy kind {cls.name!r} was replaced by a {type(kind).__name__}")
    return kind


init_scheme = _registered(initialization.InitScheme).remedy
swap_activation = _registered(structure.SwapActivation).remedy
normalization = _registered(structure.Normalization).remedy
residual = _registered(structure.Residual).remedy
clip_norm = _registered(clipping.ClipNorm).remedy
clip_value = _registered(clipping.ClipValue).remedy
autoclip = _registered(clipping.AutoClipKind).remedy
lower_lr = _registered(optimizer.LowerLR).remedy
raise_lr = _registered(optimizer.RaiseLR).remedy
warmup = _registered(optimizer.Warmup).remedy
adaptive_optimizer = _registered(optimizer.AdaptiveOptimizer).remedy
weight_decay = _registered(optimizer.WeightDecay).remedy
gate_recurrent = _registered(recurrent.GateRecurrent).remedy
forget_bias = _registered(recurrent.ForgetBias).remedy
bias_reinit = _registered(initialization.BiasReinit).remedy
truncate_bptt = _registered(recurrent.TruncateBPTT).remedy
loss_scaling = _registered(precision.LossScaling).remedy
