"""The interface every probe implements.

A probe measures one kind of evidence. The :class:`~gradmedic.monitor.Monitor`
attaches it to a model, asks it for its statistics when a step is recorded,
and detaches it on close. Probes only *read*: nothing they do may change a
forward output or a gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradmedic.layers import LayerIndex


class Probe(ABC):
    """Base class: ``attach`` / ``collect`` / ``reset`` / ``detach``.

    Attributes:
        name: Short identifier, also the option that switches it on.
    """

    name: str = "probe"
    #: Set by the monitor: called as ``on_error(probe, exc)`` when a hook fails.
    on_error: Callable[[Probe, BaseException], None] | None = None

    @abstractmethod
    def attach(self, index: LayerIndex) -> None:
        """Register hooks on the model described by ``index``."""

    @abstractmethod
    def collect(self, step: int) -> dict[str, Any]:
        """Statistics for this step as record entries (tensors stay on device).

        Values may be :class:`~gradmedic.record.NamedVector`, tensors, plain
        numbers or nested dicts/lists of those.
        """

    def reset(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Forget per-step accumulators (called after every step, recorded or not)."""

    @abstractmethod
    def detach(self) -> None:
        """Remove every hook this probe registered."""

    def set_recording(self, recording: bool) -> None:  # noqa: B027 - optional hook
        """Told before each step's forward/backward whether it will be recorded.

        Probes with per-forward cost can skip work on steps that are not recorded.
        """
