"""Work gradmedic does on its own copies (the preflight's trial steps and curvature).

Such work is not the user's training: ``gradmedic run`` (:mod:`gradmedic.autoattach`)
does not attach to the models and optimizers it builds, nor take its losses.

Example:
    >>> from gradmedic.private import in_private_work, private_work
    >>> with private_work():
    ...     in_private_work()
    True
    >>> in_private_work()
    False
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("gradmedic_private", default=0)


@contextlib.contextmanager
def private_work() -> Iterator[None]:
    """Mark the enclosed code (or a decorated function) as gradmedic's own work."""
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield
    finally:
        _DEPTH.reset(token)


def in_private_work() -> bool:
    """Whether the caller runs inside :func:`private_work`."""
    return _DEPTH.get() > 0
