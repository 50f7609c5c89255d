"""From ``Remedy.name`` to code that applies it to a candidate, through the remedy registry.

Two kinds of remedy (:mod:`gradmedic.remedies.registry` holds them all):

- *model* remedies (initialization, surgery) change a fresh model through
  :mod:`gradmedic.remedies.init` and :mod:`gradmedic.remedies.surgery`;
- *training* remedies (clipping, learning rate, optimizer, weight decay,
  truncated BPTT) become :class:`TrainSettings` of the training harness.

Each kind's :class:`Applier` says where its line goes in the pasteable snippet,
the order in which combined remedies are applied (``stage``) and which other
remedies it excludes (``group``: two initializations do not combine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.findings import Remedy
from gradmedic.remedies.base import Applier, NotApplicable, TrainSettings
from gradmedic.remedies.kinds.structure import ACTIVATIONS
from gradmedic.remedies.registry import kind_of, kinds

__all__ = [
    "ACTIVATIONS",
    "Applier",
    "NotApplicable",
    "TrainSettings",
    "applier_for",
    "apply_model",
    "compatible",
    "order",
    "settings_for",
    "whole_catalog",
]


def applier_for(remedy: Remedy | str) -> Applier:
    """The :class:`Applier` of a remedy (by ``Remedy.name``).

    Raises:
        GradmedicError: For a name the repair search does not know.
    """
    return kind_of(remedy).applier


def order(remedies: Sequence[Remedy]) -> list[Remedy]:
    """Remedies in application order (structure, init, optimizer, loop)."""
    return sorted(remedies, key=lambda r: kind_of(r).stage)


# Groups that exclude each other: Adam brings its own learning rate (1e-3), so an lr
# factor on top of it would rescale a number no finding measured.
_EXCLUSIVE = (frozenset({"optimizer", "lr"}),)


def compatible(remedies: Sequence[Remedy]) -> bool:
    """No two remedies of one group (two initializations), nor Adam with an lr change."""
    groups = [kind_of(r).group for r in remedies]
    if len(groups) != len(set(groups)):
        return False
    return not any(pair <= set(groups) for pair in _EXCLUSIVE)


def apply_model(model: nn.Module, remedies: Sequence[Remedy], batch: torch.Tensor) -> nn.Module:
    """Apply the model remedies, in stage order, to ``model`` (a fresh copy).

    Raises:
        NotApplicable: A remedy does not fit the model: it lacks the modules the
            remedy acts on, or the remedy's own code refused it with a
            :class:`~gradmedic.errors.GradmedicError` naming why.
    """
    for remedy in order(remedies):
        kind = kind_of(remedy)
        kind.check(model)
        if kind.where != "model":
            continue
        try:
            model = kind.apply(model, remedy, batch)
        except NotApplicable:
            raise
        except GradmedicError as exc:  # the remedy's own "cannot do this here"
            raise NotApplicable(f"{remedy.name}: {exc}") from exc
    return model


def settings_for(remedies: Sequence[Remedy]) -> TrainSettings:
    """The training settings the training remedies amount to."""
    settings = TrainSettings()
    for remedy in order(remedies):
        kind = kind_of(remedy)
        if kind.where != "model":
            settings = kind.configure(settings, remedy)
    return settings


def whole_catalog(model: nn.Module) -> list[Remedy]:
    """Every registered remedy that applies to ``model``, with default arguments.

    The pool of the random-remedy search: each kind's ``defaults(model)``, for the
    kinds whose ``check`` accepts the model.
    """
    pool = []
    for kind in kinds():
        try:
            kind.check(model)
        except NotApplicable:
            continue
        pool.extend(kind.defaults(model))
    return pool
