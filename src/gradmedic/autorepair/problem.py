"""The user's training setup, as the repair search needs it.

A :class:`Setup` is everything needed to train a model from scratch: a factory
for fresh models, the data, the loss, an optimizer factory and a metric. The
search trains many candidates from one setup, so every part is a *recipe*
(a factory), never a live object that training would change.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic.errors import GradmedicError

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Budget:
    """How much training each candidate gets, and the whole search.

    Attributes:
        steps: Optimizer steps per candidate (the same for every candidate).
        seconds: Wall-time cap per candidate; a safety net, since a run cut by
            time is no longer deterministic. Choose ``steps`` so it is not hit.
        total_seconds: Wall-time cap for the whole search (None: no cap).
    """

    steps: int = 200
    seconds: float = 60.0
    total_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Budget.steps must be a positive int, got {self.steps!r}")
        if not self.seconds > 0:
            raise ValueError(f"Budget.seconds must be > 0, got {self.seconds!r}")
        if self.total_seconds is not None and not self.total_seconds > 0:
            raise ValueError(
                f"Budget.total_seconds must be > 0 or None, got {self.total_seconds!r}"
            )


@dataclass(frozen=True)
class Metric:
    """A validation score computed from the model's outputs on the whole validation set.

    Attributes:
        name: Shown in the results table.
        fn: ``fn(outputs, targets) -> float`` on the concatenated validation
            outputs and targets.
        higher_is_better: Direction of improvement.
        best: The best possible value (1.0 for accuracy), if there is one; the
            acceptance margin is measured toward it.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    higher_is_better: bool = True
    best: float | None = None

    def score(self, value: float) -> float:
        """``value`` oriented so that higher is better; NaN scores worst (-inf)."""
        if math.isnan(value):
            return -math.inf
        return value if self.higher_is_better else -value


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).float().mean())


ACCURACY = Metric("accuracy", _accuracy, higher_is_better=True, best=1.0)


def loss_metric(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Metric:
    """The validation loss as a metric (lower is better)."""
    return Metric("val_loss", lambda out, y: float(loss_fn(out, y)), higher_is_better=False)


def as_metric(metric: Metric | str | Callable[..., float] | None, loss_fn: Any) -> Metric:
    """Normalize the ``metric`` argument.

    ``None`` or ``"loss"``: validation loss (lower is better); ``"accuracy"``:
    argmax accuracy; a callable ``fn(outputs, targets) -> float``: a score where
    higher is better (wrap it in :class:`Metric` for the other direction).
    """
    if metric is None or metric == "loss":
        return loss_metric(loss_fn)
    if metric == "accuracy":
        return ACCURACY
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return Metric(getattr(metric, "__name__", "metric"), metric, higher_is_better=True)
    raise ValueError(
        f"metric must be None, 'loss', 'accuracy', a gradmedic.autorepair.Metric or a callable "
        f"fn(outputs, targets) -> float; got {metric!r}"
    )


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD with learning rate 0.01 (used when the setup names no optimizer)."""
    return torch.optim.SGD(params, lr=0.01)


@dataclass
class Setup:
    """A training setup: what :func:`gradmedic.repair` needs to train a model from scratch.

    This is also the protocol of ``gradmedic fix file.py:factory``: the factory
    returns a ``Setup`` (or a dict with the same keys).

    Attributes:
        model_factory: ``() -> nn.Module`` returning a fresh model, or a model
            instance (each candidate then trains a deep copy; the instance is
            never modified).
        data: ``(train, val)``; each either a pair of tensors ``(inputs,
            targets)`` (batched by ``batch_size``, reshuffled every epoch with
            a seeded generator) or an iterable of ``(inputs, targets)`` batches
            such as a ``DataLoader`` (re-iterated when exhausted). Batches are fed
            to the model as they are: put them on the model's device.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor`` (mean-reduced).
        optimizer: ``(params) -> Optimizer``, e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.1)``; default SGD lr 0.01.
        metric: ``None``/``"loss"`` (validation loss), ``"accuracy"``, a
            :class:`Metric`, or ``fn(outputs, targets) -> float`` (higher better).
        batch_size: Batch size when ``train`` is a pair of tensors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> setup = Setup(lambda: nn.Linear(4, 1), ((x, y), (x, y)), nn.MSELoss())
        >>> setup.fresh_model()
        Linear(in_features=4, out_features=1, bias=True)
    """

    model_factory: Callable[[], nn.Module] | nn.Module
    data: tuple[Any, Any]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: OptimizerFactory | None = None
    metric: Metric | str | Callable[..., float] | None = None
    batch_size: int = 64
    _metric: Metric = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.model_factory, nn.Module) or callable(self.model_factory)):
            raise TypeError(
                "model_factory must be a callable returning a fresh torch.nn.Module (or a "
                f"module to copy), got {type(self.model_factory).__name__}"
            )
        if not isinstance(self.data, tuple | list) or len(self.data) != 2:
            raise ValueError(
                "data must be a pair (train, val), each (inputs, targets) tensors or an "
                f"iterable of (inputs, targets) batches; got {type(self.data).__name__}"
            )
        for part, name in zip(self.data, ("train", "val"), strict=True):
            _check_part(part, name)
        if not callable(self.loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got {self.loss_fn!r}"
            )
        if self.optimizer is not None and not callable(self.optimizer):
            raise TypeError(
                "optimizer must be a factory (params) -> torch.optim.Optimizer, e.g. "
                f"lambda p: torch.optim.SGD(p, lr=0.1); got {type(self.optimizer).__name__}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        self._metric = as_metric(self.metric, self.loss_fn)

    @classmethod
    def from_any(cls, value: Any) -> Setup:
        """A ``Setup`` from a ``Setup`` or a dict of its fields.

        ``model`` is accepted for ``model_factory``.
        """
        if isinstance(value, Setup):
            return value
        if isinstance(value, dict):
            kwargs = dict(value)
            if "model" in kwargs and "model_factory" not in kwargs:
                kwargs["model_factory"] = kwargs.pop("model")
            allowed = {"model_factory", "data", "loss_fn", "optimizer", "metric", "batch_size"}
            unknown = sorted(set(kwargs) - allowed)
            if unknown:
                raise ValueError(
                    f"unknown setup key(s) {unknown}; expected some of {sorted(allowed)}"
                )
            missing = sorted({"model_factory", "data", "loss_fn"} - set(kwargs))
            if missing:
                raise ValueError(f"the setup dict lacks {missing}")
            return cls(**kwargs)
        raise TypeError(
            "a setup must be a gradmedic.autorepair.Setup or a dict with keys model_factory, "
            f"data, loss_fn (optional: optimizer, metric, batch_size); got {type(value).__name__}"
        )

    @property
    def resolved_metric(self) -> Metric:
        """The :class:`Metric` the search compares candidates by."""
        return self._metric

    def fresh_model(self) -> nn.Module:
        """A new model: the factory's output, or a deep copy of the given instance."""
        if isinstance(self.model_factory, nn.Module):
            return copy.deepcopy(self.model_factory)
        model = self.model_factory()
        if not isinstance(model, nn.Module):
            raise GradmedicError(
                f"model_factory() must return a torch.nn.Module, got {type(model).__name__}"
            )
        return model

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The user's optimizer (or SGD lr 0.01) over ``params``."""
        factory = self.optimizer or default_optimizer
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise GradmedicError(
                f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        return opt


def _check_part(part: Any, name: str) -> None:
    if _is_tensor_pair(part):
        x, y = part
        if len(x) != len(y):
            raise ValueError(f"{name} inputs and targets differ in length ({len(x)} vs {len(y)})")
        if len(x) == 0:
            raise ValueError(f"{name} data is empty")
        return
    if not isinstance(part, Iterable) or isinstance(part, torch.Tensor):
        raise ValueError(
            f"{name} data must be (inputs, targets) tensors or an iterable of batches, "
            f"got {type(part).__name__}"
        )


def _is_tensor_pair(part: Any) -> bool:
    return (
        isinstance(part, tuple | list)
        and len(part) == 2
        and all(isinstance(t, torch.Tensor) for t in part)
    )


def train_batches(part: Any, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless training batches: seeded reshuffles of tensors, or a re-iterated loader."""
    if _is_tensor_pair(part):
        x, y = part
        n = len(x)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]
    while True:
        empty = True
        for batch in part:
            empty = False
            yield _as_batch(batch)
        if empty:
            raise GradmedicError("the training loader yielded no batches")


def val_batches(part: Any, batch_size: int) -> Iterator[Batch]:
    """One pass over the validation data, in order."""
    if _is_tensor_pair(part):
        x, y = part
        size = max(batch_size, 512)  # no gradients: larger batches are fine
        for start in range(0, len(x), size):
            yield x[start : start + size], y[start : start + size]
        return
    for batch in part:
        yield _as_batch(batch)


def _as_batch(batch: Any) -> Batch:
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise GradmedicError(
        f"each data batch must be a pair (inputs, targets), got {type(batch).__name__}"
    )
