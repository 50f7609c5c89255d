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
    trial_steps: int = 10,
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
            lr=0.01, momentum=0.9)``). Then the step size is judged too
            (:mod:`gradmedic.step_size`): the top Hessian eigenvalue at init and
            after ``trial_steps`` steps on a copy against the optimizer's
            stability limit; ``context["step_size"]`` holds the numbers and an
            ``unstable_updates`` finding the verdict. The model, the optimizer and
            every RNG (torch CPU/CUDA, ``random``, NumPy) are left as they were.
        trial_steps: Steps taken on the copy (with ``optimizer``).

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
    with _preserved(model):
        model.train()
        with (
            _ModuleTrace(model) as trace,
            watch(model, activations=True, recurrent=has_recurrent(model), updates=False) as mon,
        ):
            output = _call(model, inputs)
            loss = _loss(output, targets, loss_fn)
            loss.backward()
            mon.step(loss=loss)
            rows = mon.history.rows()
            layers = mon.layers
    context = model_context(model, layers, trace.order)
    if trace.nonfinite is not None:
        context["nonfinite_module"] = trace.nonfinite
    diagnosis = diagnose_rows(rows, config, layers=layers, context=context)
    diagnosis.findings = [dataclasses.replace(f, step=None) for f in diagnosis.findings]
    diagnosis.context["loss"] = float(loss.detach())
    theory = _theory(model, inputs)
    if theory is not None:
        diagnosis.context["theory"] = theory
    if optimizer is not None:
        _judge_step(diagnosis, model, inputs, targets, loss_fn, optimizer, trial_steps)
    return diagnosis


def _judge_step(
    diagnosis: Diagnosis,
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None,
    loss_fn: LossFn | None,
    optimizer: OptimizerLike,
    steps: int,
) -> None:
    """Add the step-size judgement (context and finding) to ``diagnosis``."""
    from gradmedic.step_size import judge_step

    judgement = judge_step(
        model, optimizer, lambda m: _loss(_call(m, inputs), targets, loss_fn), steps=steps
    )
    diagnosis.context["step_size"] = judgement.to_dict()
    finding = judgement.finding()
    if finding is not None:
        diagnosis.findings.append(finding)
        diagnosis.findings.sort(key=lambda f: -f.severity.rank)
        ev = finding.evidence
        diagnosis.suggested.update(  # one lr rule for the whole diagnosis: the measured one
            lr_factor=ev["lr_factor"],
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


class _ModuleTrace:
    """Forward hooks on every module: completion order and the first non-finite output."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.order: list[str] = []
        self.nonfinite: str | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _ModuleTrace:
        for name, module in self.model.named_modules():
            if name:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.order.append(name)
            out = first_tensor(output)
            if (
                self.nonfinite is None
                and out is not None
                and out.is_floating_point()
                and not bool(torch.isfinite(out).all())
                and _is_leaf_or_layer(module)
            ):
                self.nonfinite = name

        return hook


def _is_leaf_or_layer(module: nn.Module) -> bool:
    return not any(True for _ in module.children()) or any(
        True for _ in module.parameters(recurse=False)
    )


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
