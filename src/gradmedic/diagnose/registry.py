"""The detector registry: one pure function per Problem, and the record keys it reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradmedic.findings import Finding, Problem

Rows = Sequence[Mapping[str, Any]]
Detector = Callable[[Rows, Any], list[Finding]]

DETECTORS: dict[Problem, Detector] = {}


@dataclass(frozen=True)
class Needs:
    """Record keys a detector reads (any one suffices) and why it is blind without them."""

    keys: tuple[str, ...]
    why: str


NEEDS: dict[Problem, Needs] = {}


def register(
    problem: Problem, *, needs: Sequence[str] = (), why: str = ""
) -> Callable[[Detector], Detector]:
    """Register ``fn(rows, config) -> list[Finding]`` as the detector of ``problem``.

    Args:
        problem: The problem it detects.
        needs: Record keys it reads; the problem is reported as not checked
            (``Diagnosis.coverage.not_checked``) when no record holds any of them.
        why: The sentence given then.
    """

    def wrap(fn: Detector) -> Detector:
        DETECTORS[problem] = fn
        if needs:
            NEEDS[problem] = Needs(tuple(needs), why or f"no record holds {', '.join(needs)}")
        return fn

    return wrap
