"""A preflight before training: one forward and backward pass, then the detectors.

Example:
    >>> import torch, gradmedic
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> layers = [m for _ in range(19) for m in (torch.nn.Linear(64, 64), torch.nn.Sigmoid())]
    >>> model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 10))
    >>> diagnosis = gradmedic.check(model, torch.randn(32, 64), torch.randint(0, 10, (32,)))
    >>> [f.problem.value for f in diagnosis.findings]
    ['vanishing']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gradmedic.context import model_context
from gradmedic.diagnose import DiagnosisConfig, diagnose_rows
from gradmedic.errors import GradmedicError
from gradmedic.findings import Diagnosis
from gradmedic.layers import has_recurrent
from gradmedic.private import private_work
from gradmedic.probes.deltas import first_tensor
from gradmedic.trial_steps import OptimizerLike

LossFn = Callable[[Any, Any], torch.Tensor]


@private_work()  # its forward and backward are no training step (gradmedic run)
def check(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    *,
    config: DiagnosisConfig | None = None,
    optimizer: OptimizerLike | None = None,
    trial_steps: int = 300,
    trial_batch: int = 64,
) -> Diagnosis:
    """Diagnose a model's gradient flow on one batch, before any training.

    Runs one forward and backward pass in training mode under a monitor with
    deltas and activation statistics, runs every detector on that one record
    and adds the mean-field prediction (``context["theory"]``) where the
    theory covers the model. The model is left as it was: gradients,
    train/eval mode, buffers (BatchNorm statistics) and the RNG state are
    restored.

    Args:
        model: The model.
        inputs: A tensor (``model(inputs)``), a tuple/list (``model(*inputs)``)
            or a dict (``model(**inputs)``).
        targets: Integer class targets (cross-entropy), float targets (MSE),
            or None: then the loss is ``(out * r).sum() / batch`` with a fixed
            ``r ~ N(0, 1)``, whose gradient at the output does not depend on
            the model's depth or scale.
        loss_fn: ``loss_fn(output, targets) -> scalar``; overrides the default.
        config: Detector thresholds.
        optimizer: The optimizer training will use, over ``model.parameters()``,
            or a factory ``params -> Optimizer`` (``functools.partial(torch.optim.SGD,
            lr=0.01, momentum=0.9)``). Then the training is judged too
            (:mod:`gradmedic.step_size`): up to ``trial_steps`` steps on copies,
            on minibatches of ``trial_batch`` drawn from ``inputs``, judged by
            what their loss does (diverges, falls then rises back, never falls),
            with the top Hessian eigenvalue at init and after the trial against
            the optimizer's stability limit as evidence; ``context["step_size"]``
            holds the numbers, an ``unstable_updates`` or ``small_steps``
            finding the verdict. The model, the optimizer and every RNG (torch
            CPU/CUDA, ``random``, NumPy) are left as they were.
        trial_steps: Most steps taken on the copy (with ``optimizer``); the
            verdict covers them. The trial stops early once the loss is below a
            tenth of where it started.
        trial_batch: Examples per trial step (your training batch size).

    Returns:
        The :class:`~gradmedic.findings.Diagnosis`; findings carry ``step=None``.

    Raises:
        GradmedicError: The model has no trainable parameters.
        TypeError: ``model`` is not a module or ``loss_fn`` not callable.
        ValueError: The output and targets do not fit the default loss.
    """
    from gradmedic.monitor import watch

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        frozen = next(model.parameters(), None) is not None
        raise GradmedicError(
            f"the model ({type(model).__name__}) has no trainable parameters"
            + (" (all are frozen: requires_grad=False)" if frozen else "")
            + ": check() diagnoses the gradients of trainable weights; "
            + (
                "unfreeze them with model.requires_grad_(True)"
                if frozen
                else "pass the whole network whose layers have weights, e.g. "
                "nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))"
            )
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(output, targets), got {type(loss_fn).__name__}")
    if not (
        optimizer is None or isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)
    ):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a factory params -> Optimizer, "
            f"got {type(optimizer).__name__}"
        )
    if trial_steps < 0:
        raise ValueError(f"trial_steps must be >= 0, got {trial_steps}")
    if trial_batch < 1:
        raise ValueError(f"trial_batch must be >= 1 (your training batch size), got {trial_batch}")
    with _preserved(model):
        model.train()
        # One recorded step of a monitor: its tracer gives the forward order (which
        # activation follows each layer) and the module that made a NaN/Inf, as watch()'s.
        with watch(model, activations=True, recurrent=has_recurrent(model), updates=False) as mon:
            output = _call(model, inputs)
            loss = _loss(output, targets, loss_fn)
            loss.backward()
            mon.step(loss=loss)
            rows = mon.history.rows()
            layers = mon.layers
    context = model_context(model, layers, mon.forward_order)
    diagnosis = diagnose_rows(rows, config, layers=layers, context=context)
    diagnosis.findings = [dataclasses.replace(f, step=None) for f in diagnosis.findings]
    diagnosis.context["loss"] = float(loss.detach())
    theory = _theory(model, inputs)
    if theory is not None:
        diagnosis.context["theory"] = theory
    if optimizer is not None:
        _judge_step(diagnosis, model, inputs, targets, loss_fn, optimizer, trial_steps, trial_batch)
    return diagnosis


def _judge_step(
    diagnosis: Diagnosis,
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None,
    loss_fn: LossFn | None,
    optimizer: OptimizerLike,
    steps: int,
    batch: int,
) -> None:
    """Add the step judgement (context and finding) to ``diagnosis``.

    The trial steps descend minibatches of ``batch`` examples drawn from
    ``inputs``; the curvature and the loss at init are taken on the first
    ``batch`` examples.
    """
    from gradmedic.learnable import linear_headroom
    from gradmedic.step_size import constant_baseline, judge_step
    from gradmedic.trial_steps import batch_size_of, minibatches, take

    n = batch_size_of(targets, inputs) or 0
    if n < 2 or (isinstance(targets, torch.Tensor) and targets.dim() == 0):
        n = batch = 0  # nothing to draw minibatches from: every step on the whole batch
    batch = min(batch, n)
    index = minibatches(n, batch) if n else None
    first = torch.arange(batch)

    def on(m: nn.Module, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return _loss(_call(m, inputs), targets, loss_fn)
        return _loss(_call(m, take(inputs, idx, n)), take(targets, idx, n), loss_fn)

    def loss_of(m: nn.Module) -> torch.Tensor:
        return on(m, first if n else None)

    def step_loss(m: nn.Module, k: int) -> torch.Tensor:
        return on(m, index(k) if index is not None else None)

    judgement = judge_step(
        model,
        optimizer,
        loss_of,
        steps=steps,
        step_loss=step_loss,
        baseline=constant_baseline(targets) if loss_fn is None else float("nan"),
        headroom=linear_headroom(inputs, targets),
        batch=batch,
        examples=n,
    )
    diagnosis.context["step_size"] = judgement.to_dict()
    finding = judgement.finding()
    if finding is not None:
        diagnosis.findings.append(finding)
        diagnosis.findings.sort(key=lambda f: -f.severity.rank)
        ev = finding.evidence
        factor = ev["lr_factor"]
        if factor != 1.0:  # one lr rule for the whole diagnosis: the measured one
            diagnosis.suggested.update(
                lr_factor=factor,
                lr=[ev["lr"]],
                lr_why=f"the largest stable lr {ev['largest_safe_lr']:.3g} for the measured "
                f"sharpness ({ev['limit_rule']}), with a margin of 2",
            )


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore .grad, train/eval modes, buffers and the RNG state afterwards."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    for p in params:
        p.grad = None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    return model(inputs)


def _loss(output: Any, targets: torch.Tensor | None, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        return loss.reshape(())
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        output = output["logits"]
    out = first_tensor(output)
    if out is None or not out.is_floating_point():
        raise ValueError(
            "the model's output holds no floating-point tensor; pass loss_fn=... to check()"
        )
    if targets is None:
        gen = torch.Generator().manual_seed(0)
        r = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
        batch = out.shape[0] if out.dim() > 0 else 1
        return (out * r).sum() / batch
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor or None, got {type(targets).__name__}")
    if not targets.is_floating_point():
        if out.dim() < 2 or out.shape[:-1] != targets.shape:
            raise ValueError(
                f"integer targets of shape {tuple(targets.shape)} need an output of shape "
                f"(*targets.shape, classes), got {tuple(out.shape)}; pass loss_fn=... otherwise"
            )
        return nn.functional.cross_entropy(out.flatten(0, -2), targets.flatten())
    if out.shape != targets.shape:
        raise ValueError(
            f"float targets of shape {tuple(targets.shape)} do not match the output shape "
            f"{tuple(out.shape)} for the default MSE loss; pass loss_fn=... otherwise"
        )
    return nn.functional.mse_loss(out, targets)


def _theory(model: nn.Module, inputs: Any) -> dict[str, Any] | None:
    """The mean-field prediction as plain data, where the theory covers the model."""
    try:
        from gradmedic.theory import predicted_gain
    except ImportError:
        return None
    x = inputs if isinstance(inputs, torch.Tensor) else None
    variance = float(x.float().pow(2).mean()) if x is not None and x.is_floating_point() else 1.0
    if not math.isfinite(variance) or variance <= 0:
        variance = 1.0
    prediction = predicted_gain(model, input_variance=variance)
    if not getattr(prediction, "covered", False):
        return None
    data = dataclasses.asdict(prediction)
    gains = [g for g in data.get("gains", ()) if g > 0]
    data["geometric_mean_gain"] = prediction.geometric_mean_gain
    data["total_gain"] = math.prod(gains) if gains else float("nan")
    return data
