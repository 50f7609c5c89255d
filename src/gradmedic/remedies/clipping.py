"""Gradient clipping by global norm and by value, fused and monitor-aware.

Drop-in replacements for :func:`torch.nn.utils.clip_grad_norm_` and
:func:`torch.nn.utils.clip_grad_value_` (same arguments, same numbers). The
per-parameter norms are computed once with ``torch._foreach_norm``; when a
:func:`gradmedic.watch` monitor is watching the parameters, it is told what the
clipping did and reuses those norms instead of reading the gradients again.

The adaptive clippers :class:`AutoClip`, :class:`AGC` and :class:`ZClip` live in
:mod:`gradmedic.remedies.adaptive_clipping` and are re-exported here.
"""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from gradmedic.errors import GradmedicError
from gradmedic.sharding import local_tensors
from gradmedic.tensorlists import device_groups, foreach_norms, use_foreach

if TYPE_CHECKING:  # loaded lazily by __getattr__ below (they import this module)
    from gradmedic.remedies.adaptive_clipping import AGC, AutoClip, ZClip

__all__ = ["AGC", "AutoClip", "ZClip", "clip_grad_norm_", "clip_grad_value_"]

_ADAPTIVE = ("AGC", "AutoClip", "ZClip")

Params = torch.Tensor | Iterable[torch.Tensor]


def clip_grad_norm_(
    parameters: Params,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    r"""Scale all gradients together so that their joint norm is at most ``max_norm``.

    .. math::
        \|g\| = \Big\|\big(\|g_1\|_p, \dots, \|g_n\|_p\big)\Big\|_p, \qquad
        g_i \leftarrow g_i \cdot \min\Big(\frac{\text{max\_norm}}{\|g\| + 10^{-6}}, 1\Big)

    Same arguments and numbers as :func:`torch.nn.utils.clip_grad_norm_` (seed 002's
    ``clip_grads``). No host synchronization unless ``error_if_nonfinite``.

    Args:
        parameters: A tensor or an iterable of tensors whose ``.grad`` is clipped in place.
        max_norm: The largest allowed total norm.
        norm_type: The ``p`` of the p-norm; ``float('inf')`` for the max norm.
        error_if_nonfinite: Raise if the total norm is NaN or infinite.
        foreach: Use the fused ``torch._foreach_*`` kernels (``None``: where supported).

    Returns:
        The total norm of the gradients before clipping (a 0-d tensor).

    Raises:
        GradmedicError: (a ``RuntimeError``) if ``error_if_nonfinite`` and the norm is not finite.

    Example:
        >>> import torch, gradmedic
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> float(gradmedic.clip_grad_norm_([w], max_norm=1.0))
        5.0
        >>> [round(v, 4) for v in w.grad.tolist()]
        [0.6, 0.8]
    """
    params = _as_list(parameters, warn_empty=True)
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    with torch.no_grad():
        pairs = [(p, p.grad) for p in params if p.grad is not None]
        if not pairs:
            return torch.tensor(0.0)
        grads = [g for _, g in pairs]
        monitor = active_monitor([p for p, _ in pairs])
        read: tuple[list[torch.Tensor], torch.Tensor | None] | None = None
        if monitor is not None and norm_type == 2.0 and foreach is not True:
            read = read_by_monitor(monitor, [p for p, _ in pairs], grads)
        if read is None:
            read = (foreach_norms(grads, norm_type, foreach), None)
        norms, maxes = read
        total = total_norm(norms, norm_type, grads[0].device)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise GradmedicError(
                f"The total norm of order {norm_type} of the gradients is non-finite "
                f"({float(total)}), so it cannot be clipped. Find where the NaN/Inf first "
                "appears (gradmedic.watch records its origin) or pass error_if_nonfinite=False "
                "to scale by the non-finite norm anyway."
            )
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        scale_grads_(grads, scale, foreach)
        if monitor is not None:
            notify(
                monitor,
                grads,
                norms if norm_type == 2.0 else None,
                {
                    "kind": "norm",
                    "threshold": max_norm,
                    "total_norm": total,
                    "clipped": total > max_norm,
                    "scale": scale,
                },
                maxes,
            )
    return total


def clip_grad_value_(parameters: Params, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``.

    Same arguments and numbers as :func:`torch.nn.utils.clip_grad_value_` (seed 004's
    ``clip by value at 1.0``). Unlike norm clipping this changes the gradient's direction.

    Args:
        parameters: A tensor or an iterable of tensors whose ``.grad`` is clamped in place.
        clip_value: The largest allowed absolute value of a gradient element.
        foreach: Use the fused ``torch._foreach_*`` kernels (``None``: where supported).

    Example:
        >>> import torch, gradmedic
        >>> w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.tensor([-5.0, 0.5, 2.0])
        >>> gradmedic.clip_grad_value_([w], clip_value=1.0)
        >>> w.grad.tolist()
        [-1.0, 0.5, 1.0]
    """
    params = _as_list(parameters)
    clip_value = float(clip_value)
    with torch.no_grad():
        pairs = [(p, p.grad) for p in params if p.grad is not None]
        if not pairs:
            return
        grads = [g for _, g in pairs]
        monitor = active_monitor([p for p, _ in pairs])
        if monitor is not None:
            # The monitor wants the pre-clip norm and whether anything was clamped;
            # computing them costs two extra fused passes, paid only while watched.
            device = grads[0].device
            before = total_norm(foreach_norms(grads, 2.0, foreach), 2.0, device)
            peak = total_norm(foreach_norms(grads, float("inf"), foreach), float("inf"), device)
        for device_grads, device in device_groups(local_tensors(grads)):
            if use_foreach(device_grads, device, foreach):
                torch._foreach_clamp_min_(device_grads, -clip_value)
                torch._foreach_clamp_max_(device_grads, clip_value)
            else:
                for g in device_grads:
                    g.clamp_(min=-clip_value, max=clip_value)
        if monitor is not None:
            after = total_norm(foreach_norms(grads, 2.0, foreach), 2.0, grads[0].device)
            notify(
                monitor,
                grads,
                None,
                {
                    "kind": "value",
                    "threshold": clip_value,
                    "total_norm": before,
                    "clipped": peak > clip_value,
                    "scale": after / before.clamp(min=1e-30),
                },
            )


# --- shared pieces (also used by the adaptive clippers) --------------------------------


def total_norm(norms: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The p-norm of the per-tensor p-norms: the norm of all tensors as one vector."""
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def scale_grads_(grads: list[torch.Tensor], scale: torch.Tensor, foreach: bool | None) -> None:
    """Multiply every gradient in place by the 0-d tensor ``scale`` (no host sync)."""
    for device_grads, device in device_groups(local_tensors(grads)):
        if use_foreach(device_grads, device, foreach):
            torch._foreach_mul_(device_grads, scale.to(device))
        else:
            s = scale.to(device)
            for g in device_grads:
                g.mul_(s)


def active_monitor(params: list[torch.Tensor]) -> Any:
    """The running :class:`gradmedic.Monitor` watching ``params``, or None.

    Never raises: without ``gradmedic.monitor`` or an active monitor this is a no-op.
    """
    module = _monitor_module()
    if module is None or not params:
        return None
    try:
        return module.find_monitor(params)
    except Exception as exc:  # a monitor bug must not stop training
        _warn_once(f"gradmedic: could not look up the active monitor ({exc!r}); clipping goes on.")
        return None


def read_by_monitor(
    monitor: Any, params: list[torch.Tensor], grads: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The pre-clip L2 norms the clip would compute, read by ``monitor`` with its max |g|.

    None (the clip computes its norms) when the monitor does not read them or fails to.
    """
    try:
        return monitor.read_for_clip(params, grads)
    except Exception as exc:
        _warn_once(f"gradmedic: the monitor failed to read the gradients ({exc!r}); clip goes on.")
        return None


def notify(
    monitor: Any,
    grads: list[torch.Tensor],
    per_param_norms: list[torch.Tensor] | None,
    info: dict[str, Any],
    per_param_maxes: torch.Tensor | None = None,
) -> None:
    """Tell ``monitor`` what a clipping call did; swallow (and warn about) any error in it.

    ``per_param_norms`` are the pre-clip L2 norms of ``grads`` (None when the clip did
    not scale every gradient by the one factor ``info["scale"]``); ``per_param_maxes``
    their max |g|, as :func:`read_by_monitor` returned them.
    """
    try:
        monitor.note_clip(grads, per_param_norms, info, per_param_maxes)
    except Exception as exc:
        _warn_once(f"gradmedic: the monitor rejected a clipping note ({exc!r}); clipping goes on.")


def _as_list(parameters: Params, warn_empty: bool = False) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    is_generator = isinstance(parameters, types.GeneratorType)
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(
            "parameters must be a tensor or an iterable of tensors (e.g. model.parameters()), "
            f"got {type(parameters).__name__}"
        ) from None
    if warn_empty and is_generator and not params:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
        )
    return params


_MONITOR: list[Any] = []  # [module] once imported, [None] if gradmedic.monitor is missing
_WARNED: set[str] = set()


def _monitor_module() -> Any:
    if not _MONITOR:
        try:
            _MONITOR.append(importlib.import_module("gradmedic.monitor"))
        except Exception:  # missing or broken: clipping must work without it
            _MONITOR.append(None)
    module = _MONITOR[0]
    return module if module is not None and hasattr(module, "find_monitor") else None


def _warn_once(message: str) -> None:
    key = message.split("(", 1)[0]
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def __getattr__(name: str) -> Any:
    # The adaptive clippers import this module's helpers, so they load on first use.
    if name in _ADAPTIVE:
        module = importlib.import_module("gradmedic.remedies.adaptive_clipping")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
