"""Which modules a per-module probe measures on a step: all of them, or a bounded share in turn.

A probe that hooks every layer pays a Python round trip and a few kernels per
layer per step, so its cost grows with depth while a deep net's step does not
grow as fast (a 1000-layer net of Linear(32) paid 1.8x a bare step for the
deltas alone). Hooking at most :data:`PER_STEP` modules per measured step makes
the cost flat in depth. A model with up to ``PER_STEP`` modules is measured
whole on every step; a deeper one is split into ``k = ceil(n / PER_STEP)``
interleaved shares (every ``k``-th module), measured in turn, so each step's
share spans the whole depth (the depth profile and its fitted gain are still
there on every step) and every module is measured once in ``k`` measured steps.

Example:
    >>> share(("a", "b", "c", "d", "e"), turn=1, limit=2)
    ('b', 'e')
    >>> share(("a", "b"), turn=7, limit=2)
    ('a', 'b')
"""

from __future__ import annotations

from collections.abc import Sequence

#: Modules one probe measures per step at most.
PER_STEP = 32


def shares(count: int, limit: int = PER_STEP) -> int:
    """How many interleaved shares ``count`` modules are split into (1: all at once)."""
    return max(1, -(-count // limit))


def share(names: Sequence[str], turn: int, limit: int = PER_STEP) -> tuple[str, ...]:
    """The names measured on the ``turn``-th measured step: every k-th, from ``turn % k``."""
    k = shares(len(names), limit)
    return tuple(names[turn % k :: k])
