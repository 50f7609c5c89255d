"""What every kind of remedy is: :class:`RemedyKind`, and the data it works on.

A kind (``clip_norm``, ``swap_*``, ``*_init``...) builds the :class:`Remedy`
values findings carry (its constructor, :meth:`RemedyKind.remedy`), applies one
to a model (:meth:`RemedyKind.apply`) or to the training settings
(:meth:`RemedyKind.configure`), says where its lines go in a pasteable snippet
(:meth:`RemedyKind.lines`), and whether it fits a model and an optimizer
(:meth:`RemedyKind.check`, raising :class:`NotApplicable`). The registry
(:mod:`gradmedic.remedies.registry`) holds one instance of each.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.findings import Remedy

SECTIONS = ("model", "optimizer", "setup", "loop")
"""Snippet sections in script order: after the model is built, the optimizer, objects
the loop uses (built once), and between ``loss.backward()`` and ``optimizer.step()``."""


class NotApplicable(GradmedicError):
    """A remedy that does not fit this model (no RNN to gate, no bias to reset...).

    The only error the repair search records and skips: any other exception is a
    bug (in gradmedic or the user's code) and propagates.
    """


@dataclass(frozen=True)
class TrainSettings:
    """Training-loop changes a candidate gets (all off by default).

    Attributes:
        clip_norm: Clip the global gradient norm at this value.
        clip_value: Clip each gradient element to ``[-v, v]``.
        autoclip: Percentile for :class:`gradmedic.AutoClip`.
        lr_factor: Multiplies every parameter group's learning rate.
        adam_lr: Replace the optimizer by Adam with this learning rate.
        weight_decay: L2 decay added by :func:`gradmedic.add_weight_decay`.
        truncate_bptt: Backpropagate through at most this many time steps.
        warmup: ``(start_factor, steps)``: the lr ramps linearly from
            ``start_factor * lr`` to ``lr`` over ``steps`` steps.
    """

    clip_norm: float | None = None
    clip_value: float | None = None
    autoclip: float | None = None
    lr_factor: float = 1.0
    adam_lr: float | None = None
    weight_decay: float | None = None
    truncate_bptt: int | None = None
    warmup: tuple[float, int] | None = None


ModelFn = Callable[[nn.Module, Remedy, torch.Tensor], nn.Module]
SettingsFn = Callable[[TrainSettings, Remedy], TrainSettings]


@dataclass(frozen=True)
class Applier:
    """How one remedy is applied, as the repair search reads it (a view of its kind).

    Attributes:
        stage: Order inside a combination (structure, then init, then training).
        group: Remedies of the same group exclude each other.
        where: Snippet section: ``"model"``, ``"optimizer"`` or ``"loop"``.
        model: Changes a model (returns the changed model), or None.
        settings: Changes the training settings, or None.
        assigns: The call returns a new model (snippet writes ``model = ...``).
        needs: Module types the model must contain for the remedy to apply.
    """

    stage: int
    group: str
    where: str
    model: ModelFn | None = None
    settings: SettingsFn | None = None
    assigns: bool = False
    needs: tuple[type[nn.Module], ...] = ()

    def applicable(self, model: nn.Module) -> bool:
        """Whether the model has what this remedy acts on."""
        return not self.needs or any(isinstance(m, self.needs) for m in model.modules())


class RemedyKind:
    """One kind of remedy. Subclasses set the class attributes and define ``remedy(...)``.

    Attributes:
        name: The kind's name (the ``Remedy.name`` of its remedies unless ``pattern``).
        pattern: Regular expression the names of its remedies match in full
            (e.g. ``"swap_.+"``); defaults to ``name`` itself.
        stage: Order inside a combination: structure, init, optimizer, loop.
        group: Remedies of one group exclude each other (two initializations).
        where: Snippet section of its lines: ``"model"``, ``"optimizer"``, ``"loop"``.
            A ``"model"`` kind changes the model (:meth:`apply`); the others change
            the training settings (:meth:`configure`).
        assigns: Its call returns a new model (the snippet writes ``model = ...``).
        needs: Module types the model must contain for it to apply.
        setting: ``(field, param)``: the default :meth:`configure` sets the
            :class:`TrainSettings` ``field`` to ``convert(remedy.params[param])``.
        convert: The type of that field's value.
        summary: One line for the docs table and ``gradmedic remedies``.
        text: The remedy's sentence, a template over its params (``{max_norm:.3g}``).
        call: Its Python call, a template over its params.
        default_args: Arguments of ``remedy`` for the random search's pool.
    """

    name: ClassVar[str]
    pattern: ClassVar[str] = ""
    stage: ClassVar[int]
    group: ClassVar[str]
    where: ClassVar[str]
    assigns: ClassVar[bool] = False
    needs: ClassVar[tuple[type[nn.Module], ...]] = ()
    setting: ClassVar[tuple[str, str] | None] = None
    convert: ClassVar[type[float] | type[int]] = float
    summary: ClassVar[str] = ""
    text: ClassVar[str] = ""
    call: ClassVar[str] = ""
    default_args: ClassVar[tuple[tuple[Any, ...], ...]] = ()

    remedy: Callable[..., Remedy]
    """The constructor: the kind's arguments (plus ``why``) -> a :class:`Remedy`."""

    def owns(self, name: str) -> bool:
        """Whether ``name`` (a ``Remedy.name``) is one of this kind's remedies."""
        return re.fullmatch(self.pattern or re.escape(self.name), name) is not None

    def build(self, text: str, why: str, call: str, name: str = "", **params: Any) -> Remedy:
        """A :class:`Remedy` of this kind: ``text`` (plus ``": why"``), its call and params."""
        return Remedy(name or self.name, f"{text}: {why}" if why else text, call, params)

    def make(self, why: str, name: str = "", **params: Any) -> Remedy:
        """A :class:`Remedy` from the ``text`` and ``call`` templates filled with ``params``."""
        return self.build(
            self.text.format(**params), why, self.call.format(**params), name, **params
        )

    def defaults(self, model: nn.Module) -> list[Remedy]:
        """The remedies the random search tries on ``model`` (``default_args`` by default)."""
        return [self.remedy(*args) for args in self.default_args]

    def check(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Raise :class:`NotApplicable` when this kind does not fit the model or optimizer."""
        if self.needs and not any(isinstance(m, self.needs) for m in model.modules()):
            kinds = ", ".join(t.__name__ for t in self.needs)
            raise NotApplicable(f"{self.name} needs a {kinds} module; the model has none")

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """The model with ``remedy`` applied (a ``"model"`` kind overrides this)."""
        return model

    def configure(self, settings: TrainSettings, remedy: Remedy) -> TrainSettings:
        """The training settings with ``remedy`` applied (see ``setting``)."""
        if self.setting is None:
            return settings
        field, param = self.setting
        values: dict[str, Any] = {field: self.convert(remedy.params[param])}
        return dataclasses.replace(cast(Any, settings), **values)

    def lines(self, remedy: Remedy) -> list[tuple[str, str]]:
        """``(section, statement)`` pairs that apply ``remedy`` in a training script."""
        out = []
        for statement in statements(remedy.call):
            if self.assigns and not statement.startswith("model ="):
                statement = f"model = {statement}"
            out.append((self.where, statement))
        return out

    @property
    def applier(self) -> Applier:
        """This kind as the repair search's :class:`Applier`."""
        changes_model = self.where == "model"
        return Applier(
            self.stage,
            self.group,
            self.where,
            model=self.apply if changes_model else None,
            settings=None if changes_model else self.configure,
            assigns=self.assigns,
            needs=self.needs,
        )


def statements(call: str) -> list[str]:
    """Split ``"a = f(); a(x)"`` into statements (a ``for ...:`` line stays whole)."""
    if call.lstrip().startswith("for "):
        return [call.strip()]
    return [part.strip() for part in call.split("; ") if part.strip()]


def nn_class(name: str) -> type[nn.Module]:
    """The ``torch.nn`` module class called ``name``."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise GradmedicError(f"remedy names {name!r}, which is not a torch.nn module class")
    return cls


def lr_target(factor: float, lr: Sequence[float] | None) -> tuple[str, dict[str, Any]]:
    """``" (to 0.01)"`` and ``{"factor": ..., "lr": [...]}`` for an lr scaled by ``factor``."""
    params: dict[str, Any] = {"factor": float(factor)}
    if not lr:
        return "", params
    params["lr"] = [v * factor for v in lr]
    new = sorted(set(params["lr"]))
    return f" (to {', '.join(f'{v:.3g}' for v in new)})", params
