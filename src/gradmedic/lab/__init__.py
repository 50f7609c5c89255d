"""The lab: every claim of the source material reproduced as an experiment."""

from __future__ import annotations

from gradmedic.lab.base import (
    EXPERIMENTS,
    LabConfig,
    Result,
    Verdict,
    combine,
    experiment,
    judge,
    judge_claims,
)

__all__ = [
    "EXPERIMENTS",
    "LabConfig",
    "Result",
    "Verdict",
    "combine",
    "experiment",
    "judge",
    "judge_claims",
]
