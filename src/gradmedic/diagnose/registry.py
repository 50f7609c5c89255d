"""The detector registry: one pure function per Problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradmedic.findings import Finding, Problem

Rows = Sequence[Mapping[str, Any]]
Detector = Callable[[Rows, Any], list[Finding]]

DETECTORS: dict[Problem, Detector] = {}


def register(problem: Problem) -> Callable[[Detector], Detector]:
    """Register ``fn(rows, config) -> list[Finding]`` as the detector of ``problem``."""

    def wrap(fn: Detector) -> Detector:
        DETECTORS[problem] = fn
        return fn

    return wrap
