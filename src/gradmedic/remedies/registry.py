"""Every remedy kind gradmedic knows, one line each; how a ``Remedy`` finds its kind.

Adding a remedy: a :class:`~gradmedic.remedies.base.RemedyKind` in a file of
:mod:`gradmedic.remedies.kinds` and one line in ``BUILTIN``. Detectors build its
remedies through :mod:`gradmedic.remedies.catalog`, the repair search applies them
(:mod:`gradmedic.autorepair.appliers`), the snippet writer places their lines,
``gradmedic remedies`` and ``docs/remedies.md`` list them.
"""

from __future__ import annotations

from gradmedic.errors import GradmedicError
from gradmedic.findings import Remedy
from gradmedic.remedies.base import RemedyKind
from gradmedic.remedies.kinds import (
    clipping,
    initialization,
    optimizer,
    precision,
    recurrent,
    structure,
)

BUILTIN: tuple[RemedyKind, ...] = (
    recurrent.GateRecurrent(),
    structure.SwapActivation(),
    structure.Residual(),
    structure.Normalization(),
    initialization.InitScheme(),
    recurrent.ForgetBias(),
    initialization.BiasReinit(),
    optimizer.AdaptiveOptimizer(),
    optimizer.LowerLR(),
    optimizer.RaiseLR(),
    optimizer.Warmup(),
    optimizer.WeightDecay(),
    clipping.ClipNorm(),
    clipping.ClipValue(),
    clipping.AutoClipKind(),
    recurrent.TruncateBPTT(),
    precision.LossScaling(),
)

_KINDS: dict[str, RemedyKind] = {}


def register(kind: RemedyKind) -> RemedyKind:
    """Add ``kind`` to the registry (its ``name`` must be new); returns it.

    Raises:
        GradmedicError: A kind of that name is registered already.
    """
    if kind.name in _KINDS:
        raise GradmedicError(
            f"a remedy kind named {kind.name!r} is registered already; "
            "pick another name or unregister() it first"
        )
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove the kind called ``name`` (a no-op when there is none)."""
    _KINDS.pop(name, None)


def kinds() -> list[RemedyKind]:
    """The registered kinds, in registration order."""
    return list(_KINDS.values())


def get(name: str) -> RemedyKind:
    """The kind called ``name`` (``RemedyKind.name``, e.g. ``"clip_norm"``).

    Raises:
        GradmedicError: No kind of that name.
    """
    if name not in _KINDS:
        raise GradmedicError(f"no remedy kind {name!r}; known: {sorted(_KINDS)}")
    return _KINDS[name]


def kind_of(remedy: Remedy | str) -> RemedyKind:
    """The kind a remedy (or a ``Remedy.name``) belongs to: the first that owns its name.

    Raises:
        GradmedicError: For a name no registered kind owns.
    """
    name = remedy if isinstance(remedy, str) else remedy.name
    for kind in _KINDS.values():
        if kind.owns(name):
            return kind
    known = ", ".join(k.pattern or k.name for k in _KINDS.values())
    raise GradmedicError(f"no repair applier for remedy {name!r}; known: {known}")


for _kind in BUILTIN:
    register(_kind)
