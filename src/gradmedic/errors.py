"""The one exception gradmedic raises for its users' mistakes."""

from __future__ import annotations


class GradmedicError(RuntimeError):
    """A problem with how gradmedic was called or with the data it was given.

    The message always says what was wrong and how to fix it.
    """
