"""The bar a repair must clear: the metric of a trivial predictor, plus a margin.

A model that "trains" can still predict nothing: a 10-class net stuck at 9%
accuracy, whose loss fell from 2.31 to 2.30. The search therefore computes
what a predictor that ignores its input scores on the validation data and asks
each candidate to beat it clearly:

- class targets (integer tensors) and ``(n, C)`` outputs: constant logits
  ``log p(class)`` from the training targets, i.e. always the majority class
  (its accuracy; its cross-entropy is the targets' entropy);
- real-valued targets of the outputs' shape: the training targets' mean (for
  MSE, the targets' variance).

"Clearly" is ``MARGIN`` (a fifth) of the way from that score to the metric's
best possible value (accuracy 1, loss 0); for a metric without a known best, a
fifth of the trivial score's own size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from gradmedic.autorepair.problem import Metric, Setup, train_batches, val_batches

MARGIN = 0.2
_TRAIN_BATCHES = 200  # enough of a loader's targets to estimate class frequencies or a mean


@dataclass(frozen=True)
class Reference:
    """The trivial predictor's score and the score a repair must reach.

    Attributes:
        name: What the trivial predictor is, e.g. ``"the majority class"``.
        value: Its metric on the validation data.
        needed: The metric a candidate must reach (at least, or at most for a
            lower-is-better metric).
    """

    name: str
    value: float
    needed: float

    def passes(self, metric: Metric, value: float) -> bool:
        """Whether ``value`` clears the bar, strictly beyond the trivial score (NaN never does)."""
        if not math.isfinite(value) or self.margin(metric, value) <= 0:
            return False
        return value >= self.needed if metric.higher_is_better else value <= self.needed

    def margin(self, metric: Metric, value: float) -> float:
        """How far ``value`` is beyond the trivial score (positive: better)."""
        return value - self.value if metric.higher_is_better else self.value - value


def needed(metric: Metric, value: float, margin: float = MARGIN) -> float:
    """The score ``margin`` of the way from ``value`` to the metric's best.

    Example:
        >>> from gradmedic.autorepair.problem import ACCURACY
        >>> round(needed(ACCURACY, 0.1), 6)
        0.28
    """
    if metric.best is not None:
        return value + margin * (metric.best - value)
    step = margin * abs(value)
    return value + step if metric.higher_is_better else value - step


def reference(setup: Setup, outputs: torch.Tensor) -> Reference | None:
    """The trivial predictor's :class:`Reference` for ``setup`` (None when none fits).

    Args:
        setup: The setup (its training targets give the constant prediction).
        outputs: A model's outputs on one validation batch (their shape per sample).
    """
    y_val = torch.cat([y for _, y in val_batches(setup.data[1], setup.batch_size)])
    y_train = _train_targets(setup)
    n = len(y_val)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1:
        return None
    if _is_classes(y_train) and _is_classes(y_val) and outputs.dim() == 2:
        classes = outputs.shape[1]
        if int(y_train.max()) >= classes or int(y_val.min()) < 0:
            return None
        freq = torch.bincount(y_train.flatten(), minlength=classes).double() / y_train.numel()
        out = torch.log(freq + 1e-12).to(outputs.dtype).expand(n, classes).clone()
        name = "the majority class"
    elif y_train.is_floating_point() and y_val.shape[1:] == outputs.shape[1:]:
        out = y_train.mean(dim=0, keepdim=True).to(outputs.dtype).expand_as(y_val).clone()
        name = "the training targets' mean"
    else:
        return None
    metric = setup.resolved_metric
    value = float(metric.fn(out, y_val))
    if not math.isfinite(value):
        return None
    return Reference(name, value, needed(metric, value))


def _is_classes(y: torch.Tensor) -> bool:
    return not y.is_floating_point() and not y.is_complex() and y.dim() == 1 and y.numel() > 0


def _train_targets(setup: Setup) -> torch.Tensor:
    batches = train_batches(setup.data[0], setup.batch_size, torch.Generator().manual_seed(0))
    part = setup.data[0]
    if isinstance(part, tuple | list) and len(part) == 2 and isinstance(part[1], torch.Tensor):
        return part[1]
    return torch.cat([y for _, y in itertools.islice(batches, _TRAIN_BATCHES)])
