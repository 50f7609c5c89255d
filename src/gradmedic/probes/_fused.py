"""Fused reductions over lists of tensors (one kernel launch per device and dtype)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def foreach_norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    """Per-tensor vector norms, computed by ``torch._foreach_norm`` per (device, dtype) group.

    Half-precision tensors are reduced in float32 so their norms do not overflow.
    Returns 0-d float tensors (float32, or float64 for float64 inputs), in input order.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for (_, dtype), idx in groups.items():
        members = [tensors[i] for i in idx]
        if dtype in _LOW_PRECISION:
            norms = torch._foreach_norm(members, ord, dtype=torch.float32)
        elif dtype.is_floating_point:
            norms = torch._foreach_norm(members, ord)
        else:
            norms = [torch.linalg.vector_norm(t.double(), ord) for t in members]
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return out


def abs_maxes(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``max |t|`` of each tensor as one float64 vector on ``device`` (NaN propagates).

    ``torch.aminmax`` is several times faster on CPU than an infinity norm
    (``torch._foreach_norm(ts, inf)`` or ``vector_norm(t, inf)``) and reads each
    tensor once without allocating ``|t|``.
    """
    mins, maxs = [], []
    for t in tensors:
        if t.numel() == 0:
            t = t.new_zeros(1)
        lo, hi = torch.aminmax(t.detach())
        mins.append(lo)
        maxs.append(hi)
    lo_v, hi_v = stack_on(mins, device), stack_on(maxs, device)
    return torch.maximum(lo_v.neg(), hi_v)


def stack_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-d tensors into one float64 vector on ``device``."""
    return torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors])


def segment_sqrt_sum_sq(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """``out[k] = sqrt(sum_{i: segments[i]==k} values[i]^2)`` (L2 norm of a group of norms)."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add_(0, segments, values * values).sqrt_()


def segment_max(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """``out[k] = max_{i: segments[i]==k} values[i]`` (NaN propagates)."""
    out = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, segments, values, reduce="amax", include_self=True)
