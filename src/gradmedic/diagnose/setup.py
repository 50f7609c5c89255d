"""What the training setup already has, from the context, so remedies fit it.

The context (:func:`gradmedic.context.model_context`) may say which optimizer runs
(``context["optimizer"] = {"type": "AdamW", "lr": [...], "adaptive": True}``, or
None for a loop without one) and what the model has
(``context["structure"] = {"normalization": [...], "residual": [...],
"gated": [...], "recurrent": [...]}``). Remedies that would add what is already
there are dropped: "use Adam" to an AdamW run, batch norm to a model with
normalization, residual connections to a residual model, an LSTM for an LSTM;
so are optimizer edits (weight decay groups) for a loop without an optimizer.
Without the context every remedy is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.findings import Remedy
from gradmedic.optimizer_facts import ADAPTIVE
from gradmedic.remedies import catalog


@dataclass(frozen=True)
class Setup:
    """The setup facts the remedies depend on.

    Attributes:
        optimizer_known: Whether the context says which optimizer runs.
        optimizer: Its class name (None: no optimizer, a manual update).
        adaptive: Whether it is adaptive (Adam, AdamW, RMSprop, ...).
        lr: Its learning rates, when known.
        normalization: Normalization modules of the model.
        residual: Modules with a residual (identity) path.
        gated: Gated modules (LSTM, GRU, GLU).
        recurrent: Recurrent modules.
    """

    optimizer_known: bool = False
    optimizer: str | None = None
    adaptive: bool = False
    lr: tuple[float, ...] = ()
    normalization: tuple[str, ...] = ()
    residual: tuple[str, ...] = ()
    gated: tuple[str, ...] = ()
    recurrent: tuple[str, ...] = ()

    @property
    def manual(self) -> bool:
        """A training loop known to have no optimizer."""
        return self.optimizer_known and self.optimizer is None


def setup_of(config: DiagnosisConfig) -> Setup:
    """The :class:`Setup` described by ``config.context``."""
    context: Mapping[str, Any] = config.context
    struct = context.get("structure") or {}

    def names(key: str) -> tuple[str, ...]:
        return tuple(str(n) for n in struct.get(key) or ())

    known = "optimizer" in context
    opt = context.get("optimizer")
    kind = None
    adaptive = False
    lr: tuple[float, ...] = ()
    if isinstance(opt, Mapping):
        kind = str(opt.get("type")) if opt.get("type") else "optimizer"
        adaptive = bool(opt.get("adaptive", kind in ADAPTIVE))
        lr = tuple(float(v) for v in opt.get("lr") or () if isinstance(v, int | float))
    elif isinstance(opt, str):
        kind, adaptive = opt, opt in ADAPTIVE
    return Setup(
        optimizer_known=known,
        optimizer=kind,
        adaptive=adaptive,
        lr=lr,
        normalization=names("normalization"),
        residual=names("residual"),
        gated=names("gated"),
        recurrent=names("recurrent"),
    )


def fits(remedy: Remedy, setup: Setup) -> bool:
    """Whether ``remedy`` adds something the setup does not already have."""
    name = remedy.name
    if name == "adaptive_optimizer":
        return not setup.adaptive
    if name in ("batch_norm", "layer_norm"):
        return not setup.normalization
    if name == "residual":
        return not setup.residual
    if name == "weight_decay":
        return not setup.manual  # gradmedic.add_weight_decay edits an optimizer's groups
    if name.startswith("gate_"):
        # gating an already gated recurrence changes nothing
        return not setup.recurrent or not set(setup.recurrent) <= set(setup.gated)
    return True


def tailored(remedies: Sequence[Remedy], setup: Setup) -> list[Remedy]:
    """``remedies`` without those that do not fit, in the same order."""
    return [r for r in remedies if fits(r, setup)]


def lower_lr(setup: Setup, factor: float, why: str, lr: Sequence[float] | None = None) -> Remedy:
    """:func:`catalog.lower_lr` for this setup (the loop's own lr without an optimizer)."""
    current = list(lr) if lr else (list(setup.lr) or None)
    return catalog.lower_lr(factor, why, optimizer=not setup.manual, lr=current)


def warmup(setup: Setup, start_factor: float, steps: int, why: str) -> Remedy:
    """:func:`catalog.warmup` for this setup."""
    return catalog.warmup(start_factor, steps, why, optimizer=not setup.manual)


def adaptive_optimizer(setup: Setup, why: str) -> Remedy:
    """:func:`catalog.adaptive_optimizer` naming what it replaces."""
    current = "none" if setup.manual else setup.optimizer
    return catalog.adaptive_optimizer(why, current=current)
