"""Automatic repair: from findings to a model that trains, proven by retraining.

``gradmedic.repair(factory, data, loss_fn, ...)`` trains the setup briefly under a
monitor, diagnoses it, tries the findings' ranked remedies on fresh copies with
the same budget and seed, and accepts the first candidate that is healthy and
trains no worse. See :func:`gradmedic.autorepair.search.repair`.

The package is not named ``repair``: importing it would bind ``gradmedic.repair``
to the package and shadow the function.
"""

from __future__ import annotations

from gradmedic.autorepair.appliers import TrainSettings
from gradmedic.autorepair.problem import Budget, Metric, Setup
from gradmedic.autorepair.result import Candidate, RepairResult
from gradmedic.autorepair.search import Progress, repair
from gradmedic.autorepair.snippet import snippet
from gradmedic.autorepair.train import TrainOutcome, train

__all__ = [
    "Budget",
    "Candidate",
    "Metric",
    "Progress",
    "RepairResult",
    "Setup",
    "TrainOutcome",
    "TrainSettings",
    "repair",
    "snippet",
    "train",
]
