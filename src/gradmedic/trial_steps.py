"""A few optimizer steps taken on a copy, leaving the user's run exactly as it was.

The model and the optimizer are deep-copied together (so the copied optimizer
steps the copied parameters), and every random state a step can touch is
saved and restored: torch's CPU and CUDA generators, Python's ``random`` and
NumPy's global generator.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> before = model.weight.detach().clone()
    >>> run = trial_steps(model, opt, lambda m: m(torch.ones(4, 3)).pow(2).mean(), steps=3)
    >>> len(run.losses), torch.equal(model.weight, before)
    (3, True)
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic.errors import GradmedicError

#: An optimizer, or a factory building one from parameters (``functools.partial(SGD, lr=..)``).
OptimizerLike = torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class TrialRun:
    """What the trial steps saw.

    Attributes:
        losses: The loss before each step (non-finite ones included; the run
            stops at the first).
        model: The copied model after the steps.
        optimizer: The copied optimizer after the steps (its state: Adam's ``v``).
        initial_model: A copy of the model before the steps, for curvature at init.
    """

    losses: list[float] = field(default_factory=list)
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    initial_model: nn.Module | None = None

    @property
    def diverged(self) -> bool:
        """A loss became non-finite."""
        return any(not math.isfinite(v) for v in self.losses)


@contextmanager
def preserved_rng(devices: Iterable[int] = ()) -> Iterator[None]:
    """Save and restore torch (CPU and the CUDA ``devices``), ``random`` and NumPy RNG states."""
    py_state = random.getstate()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the core
        np_state = None
    else:
        np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA device indices ``model``'s parameters live on."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def copy_pair(
    model: nn.Module, optimizer: OptimizerLike
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of ``model`` and ``optimizer``, the copy stepping the copied parameters.

    Raises:
        GradmedicError: The optimizer steps tensors that are not the model's, or
            cannot be copied, or the factory does not return an optimizer.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        stray = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        if stray:
            raise GradmedicError(
                f"the optimizer steps {len(stray)} tensor(s) that are not parameters of the "
                "model: build it over this model, e.g. torch.optim.SGD(model.parameters(), lr=0.01)"
            )
        try:
            memo = _hookless_memo(model, optimizer)
            model_copy, opt_copy = copy.deepcopy((model, optimizer), memo)
        except Exception as exc:
            raise GradmedicError(
                f"could not copy the {type(optimizer).__name__} optimizer for the trial steps "
                f"({exc}); pass a factory instead, e.g. functools.partial(torch.optim.SGD, lr=0.01)"
            ) from exc
        return model_copy, opt_copy
    if not callable(optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a factory params -> Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    model_copy = private_copy(model)
    built = optimizer(model_copy.parameters())
    if not isinstance(built, torch.optim.Optimizer):
        raise GradmedicError(
            f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer"
        )
    return model_copy, built


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its hooks (nothing it runs reaches the user's)."""
    return copy.deepcopy(model, _hookless_memo(model, None))


_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _hookless_memo(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[int, Any]:
    """A deepcopy memo that copies every hook dict as an empty one.

    Hooks are bound methods of whoever installed them (a gradmedic monitor, a
    profiler): deep-copying them would copy that object, and the copies' steps
    would reach it. The trial steps run without them.
    """
    memo: dict[int, Any] = {}
    owners: list[tuple[Any, tuple[str, ...]]] = [(m, _MODULE_HOOKS) for m in model.modules()]
    if optimizer is not None:
        owners.append((optimizer, _OPTIMIZER_HOOKS))
    for owner, names in owners:
        for name in names:
            hooks = getattr(owner, name, None)
            if isinstance(hooks, dict):
                memo[id(hooks)] = type(hooks)()
    return memo


def trial_steps(
    model: nn.Module,
    optimizer: OptimizerLike,
    loss_of: Callable[[nn.Module], torch.Tensor],
    *,
    steps: int = 10,
    step_loss: Callable[[nn.Module, int], torch.Tensor] | None = None,
    stop: Callable[[Sequence[float]], bool] | None = None,
) -> TrialRun:
    """Take up to ``steps`` optimizer steps on copies of ``model`` and ``optimizer``.

    Args:
        model: The user's model (not changed).
        optimizer: The user's optimizer (not changed) or a factory.
        loss_of: ``loss_of(model_copy) -> scalar``: the loss of the trial batch.
        steps: Most steps.
        step_loss: ``step_loss(model_copy, k) -> scalar``: the loss step ``k``
            descends (a minibatch); ``loss_of`` for every step when None.
        stop: Called with the losses so far after each step; True ends the trial
            (its verdict is clear).

    Returns:
        The :class:`TrialRun`, with the copies after the steps.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    with preserved_rng(cuda_devices(model)):
        model_copy, opt = copy_pair(model, optimizer)
        run = TrialRun(model=model_copy, optimizer=opt, initial_model=copy.deepcopy(model_copy))
        model_copy.train()
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model_copy) if step_loss is None else step_loss(model_copy, k)
            run.losses.append(float(loss.detach()))
            if not math.isfinite(run.losses[-1]):
                break
            loss.backward()
            opt.step()
            if stop is not None and stop(run.losses):
                break
    return run


def minibatches(n: int, size: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """``index(k)``: the example indices of step ``k``, epochs of seeded permutations of ``n``.

    Example:
        >>> index = minibatches(5, 2)
        >>> sorted(torch.cat([index(0), index(1)]).tolist()) != sorted(index(2).tolist())
        True
    """
    if n < 1 or size < 1:
        raise ValueError(f"need n >= 1 examples and a batch size >= 1, got {n} and {size}")
    size = min(size, n)
    per_epoch = n // size
    gen = torch.Generator().manual_seed(seed)
    epochs: list[torch.Tensor] = []

    def index(k: int) -> torch.Tensor:
        epoch, pos = divmod(k, per_epoch)
        while len(epochs) <= epoch:
            epochs.append(torch.randperm(n, generator=gen))
        return epochs[epoch][pos * size : (pos + 1) * size]

    return index


def batch_size_of(*parts: Any) -> int | None:
    """The leading size shared by the first tensor found in ``parts`` (None: no tensor)."""
    for part in parts:
        if isinstance(part, torch.Tensor) and part.dim() > 0:
            return int(part.shape[0])
        if isinstance(part, Mapping):
            found = batch_size_of(*part.values())
        elif isinstance(part, list | tuple):
            found = batch_size_of(*part)
        else:
            continue
        if found is not None:
            return found
    return None


def take(batch: Any, index: torch.Tensor, n: int) -> Any:
    """``batch`` with every tensor of leading size ``n`` indexed by ``index`` (others kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[index.to(batch.device)] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: take(v, index, n) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        items = [take(v, index, n) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def facts_of(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """:func:`gradmedic.optimizer_facts.optimizer_facts` plus SGD's ``dampening``."""
    from gradmedic.optimizer_facts import optimizer_facts

    facts = optimizer_facts(optimizer) or {}
    groups = optimizer.param_groups
    if all("dampening" in g for g in groups):
        facts["dampening"] = [float(g["dampening"]) for g in groups]
    return facts
