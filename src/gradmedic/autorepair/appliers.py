"""From ``Remedy.name`` to code that applies it to a candidate.

Two kinds of remedy:

- *model* remedies (initialization, surgery) change a fresh model through
  :mod:`gradmedic.remedies.init` and :mod:`gradmedic.remedies.surgery`;
- *training* remedies (clipping, learning rate, optimizer, weight decay,
  truncated BPTT) become :class:`TrainSettings` of the training harness.

Each :class:`Applier` also says where its line goes in the pasteable snippet,
the order in which combined remedies are applied (``stage``) and which other
remedies it excludes (``group``: two initializations do not combine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.findings import Remedy
from gradmedic.layers import RECURRENT_TYPES
from gradmedic.remedies import catalog

ACTIVATIONS = ("Sigmoid", "Tanh", "ReLU", "LeakyReLU", "ELU")


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
    """How one remedy is applied.

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
        if not self.needs:
            return True
        return any(isinstance(m, self.needs) for m in model.modules())


# ---- model remedies ---------------------------------------------------------------


def _surgery() -> ModuleType:
    from gradmedic.remedies import surgery

    return surgery


def _init() -> ModuleType:
    from gradmedic.remedies import init

    return init


def _nn_class(name: str) -> type[nn.Module]:
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise GradmedicError(f"remedy names {name!r}, which is not a torch.nn module class")
    return cls


def _swap(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    mapping = {_nn_class(o): _nn_class(n) for o, n in dict(remedy.params["mapping"]).items()}
    return _surgery().swap_activations(model, mapping)


def _normalize(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    return _surgery().add_normalization(model, kind=remedy.params.get("kind", "batch"))


def _residual(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    return _surgery().residualize(model)


def _gate(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    return _surgery().gate_recurrent(model, remedy.params.get("kind", "lstm"))


def _init_scheme(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    scheme = remedy.params["scheme"]
    kwargs = {"data": batch} if scheme == "lsuv" else {}
    out = _init().apply(model, scheme, **kwargs)
    return out if isinstance(out, nn.Module) else model


def _bias(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    out = _init().apply(model, "bias", value=remedy.params.get("value", 0.01))
    return out if isinstance(out, nn.Module) else model


def _forget(model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
    out = _init().forget_gate_bias_(model, remedy.params.get("value", 1.0))
    return out if isinstance(out, nn.Module) else model


# ---- training remedies ------------------------------------------------------------


def _set(**fields: tuple[str, Callable[[Any], object]]) -> SettingsFn:
    """A settings applier copying ``remedy.params[param]`` into ``field``."""

    def apply(settings: TrainSettings, remedy: Remedy) -> TrainSettings:
        values: dict[str, Any] = {f: type_(remedy.params[p]) for f, (p, type_) in fields.items()}
        return dataclasses.replace(settings, **values)

    return apply


def _lower_lr(settings: TrainSettings, remedy: Remedy) -> TrainSettings:
    factor = float(remedy.params.get("factor", 0.1))
    return dataclasses.replace(settings, lr_factor=settings.lr_factor * factor)


def _raise_lr(settings: TrainSettings, remedy: Remedy) -> TrainSettings:
    factor = float(remedy.params["factor"])
    if not factor > 1:
        raise GradmedicError(f"raise_lr needs a factor > 1, got {factor:g}")
    return dataclasses.replace(settings, lr_factor=settings.lr_factor * factor)


def _warmup(settings: TrainSettings, remedy: Remedy) -> TrainSettings:
    start, steps = float(remedy.params["start_factor"]), int(remedy.params["steps"])
    return dataclasses.replace(settings, warmup=(start, steps))


def _adam(settings: TrainSettings, remedy: Remedy) -> TrainSettings:
    return dataclasses.replace(settings, adam_lr=float(remedy.params.get("lr", 1e-3)))


_EXACT: dict[str, Applier] = {
    "batch_norm": Applier(3, "normalization", "model", _normalize, assigns=True),
    "layer_norm": Applier(3, "normalization", "model", _normalize, assigns=True),
    "residual": Applier(2, "residual", "model", _residual, assigns=True),
    "forget_bias": Applier(5, "forget_bias", "model", _forget, needs=(nn.LSTM,)),
    "bias_reinit": Applier(6, "bias", "model", _bias),
    "adaptive_optimizer": Applier(10, "optimizer", "optimizer", settings=_adam),
    "lower_lr": Applier(11, "lr", "optimizer", settings=_lower_lr),
    "raise_lr": Applier(11, "lr", "optimizer", settings=_raise_lr),
    "warmup": Applier(12, "warmup", "optimizer", settings=_warmup),
    "weight_decay": Applier(
        12, "weight_decay", "optimizer", settings=_set(weight_decay=("weight_decay", float))
    ),
    "clip_norm": Applier(13, "clip", "loop", settings=_set(clip_norm=("max_norm", float))),
    "clip_value": Applier(13, "clip", "loop", settings=_set(clip_value=("clip_value", float))),
    "autoclip": Applier(13, "clip", "loop", settings=_set(autoclip=("percentile", float))),
    "truncate_bptt": Applier(
        14, "truncate", "loop", settings=_set(truncate_bptt=("steps", int)), needs=RECURRENT_TYPES
    ),
}

_GATE = Applier(0, "gate", "model", _gate, assigns=True, needs=(nn.RNN,))
_SWAP = Applier(1, "activation", "model", _swap, assigns=True)
_INIT = Applier(4, "init", "model", _init_scheme)


def applier_for(remedy: Remedy | str) -> Applier:
    """The :class:`Applier` of a remedy (by ``Remedy.name``).

    Raises:
        GradmedicError: For a name the repair search does not know.
    """
    name = remedy if isinstance(remedy, str) else remedy.name
    if name in _EXACT:
        return _EXACT[name]
    if name.startswith("gate_"):
        return _GATE
    if name.startswith("swap_"):
        return _SWAP
    if name.endswith("_init"):
        return _INIT
    raise GradmedicError(
        f"no repair applier for remedy {name!r}; known: {sorted(_EXACT)}, gate_*, swap_*, *_init"
    )


def order(remedies: Sequence[Remedy]) -> list[Remedy]:
    """Remedies in application order (structure, init, optimizer, loop)."""
    return sorted(remedies, key=lambda r: applier_for(r).stage)


# Groups that exclude each other: Adam brings its own learning rate (1e-3), so an lr
# factor on top of it would rescale a number no finding measured.
_EXCLUSIVE = (frozenset({"optimizer", "lr"}),)


def compatible(remedies: Sequence[Remedy]) -> bool:
    """No two remedies of one group (two initializations), nor Adam with an lr change."""
    groups = [applier_for(r).group for r in remedies]
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
        applier = applier_for(remedy)
        if not applier.applicable(model):
            kinds = ", ".join(t.__name__ for t in applier.needs)
            raise NotApplicable(f"{remedy.name} needs a {kinds} module; the model has none")
        if applier.model is not None:
            try:
                model = applier.model(model, remedy, batch)
            except NotApplicable:
                raise
            except GradmedicError as exc:  # the remedy's own "cannot do this here"
                raise NotApplicable(f"{remedy.name}: {exc}") from exc
    return model


def settings_for(remedies: Sequence[Remedy]) -> TrainSettings:
    """The training settings the training remedies amount to."""
    settings = TrainSettings()
    for remedy in order(remedies):
        fn = applier_for(remedy).settings
        if fn is not None:
            settings = fn(settings, remedy)
    return settings


def whole_catalog(model: nn.Module) -> list[Remedy]:
    """Every catalog remedy that applies to ``model``, with default arguments.

    The pool of the random-remedy search (:mod:`gradmedic.remedies.catalog`).
    """
    present = {type(m).__name__ for m in model.modules()}
    swaps = [
        catalog.swap_activation(old, new)
        for old in ACTIVATIONS
        if old in present
        for new in ("ReLU", "LeakyReLU", "ELU")
        if new != old
    ]
    pool = [
        *(catalog.init_scheme(s) for s in ("he", "xavier", "orthogonal", "lecun", "lsuv")),
        *swaps,
        catalog.normalization("batch"),
        catalog.normalization("layer"),
        catalog.residual(),
        catalog.clip_norm(1.0),
        catalog.clip_value(1.0),
        catalog.autoclip(10.0),
        catalog.lower_lr(0.1),
        catalog.adaptive_optimizer(),
        catalog.weight_decay(1e-4),
        catalog.gate_recurrent("lstm"),
        catalog.gate_recurrent("gru"),
        catalog.forget_bias(1.0),
        catalog.bias_reinit(0.01),
        catalog.truncate_bptt(10),
    ]
    return [r for r in pool if applier_for(r).applicable(model)]
