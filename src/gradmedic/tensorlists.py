"""Fused reductions over lists of tensors (gradients, parameters).

One ``torch._foreach_*`` kernel per (device, dtype) group where torch supports
it; shared by the probes and the clipping functions so both read the gradients
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

from gradmedic.sharding import any_dtensor, local_tensors, whole_p_norms, without_partial


def foreach_norms(
    grads: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    foreach: bool | None = None,
    upcast: bool = False,
    wide: bool = False,
) -> list[torch.Tensor]:
    """Per-tensor ``norm_type`` norms, in input order, exactly as torch's clipping computes them.

    One ``torch._foreach_norm`` per (device, dtype) group; half-precision inputs give
    half-precision norms, as in :func:`torch.nn.utils.get_total_norm`, unless ``upcast``
    (then they are reduced and returned in float32). ``wide`` reduces and returns them
    in float64, whose range holds the square of every float32 value: the norm of a
    finite float32 gradient then neither overflows (entries near 1e28) nor underflows
    to zero (entries near 1e-26), which a float32 sum of squares does.
    DTensors (FSDP2, tensor parallel) give the whole tensors' norms, reduced at once.
    """
    if any_dtensor(grads):  # the local pieces' norms, made the whole tensors' (reduced now)
        grads = without_partial(grads)
        local = foreach_norms(local_tensors(grads), norm_type, foreach, upcast=True)
        return whole_p_norms(grads, local, norm_type)
    out: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
    for idx, members, device in indexed_groups(grads):
        dtype = members[0].dtype
        acc = torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else None
        if wide and dtype != torch.float64:
            acc = torch.float64
        norms: Sequence[torch.Tensor]
        if use_foreach(members, device, foreach):
            norms = torch._foreach_norm(members, norm_type, dtype=acc)
        else:
            norms = [torch.linalg.vector_norm(g, norm_type, dtype=acc) for g in members]
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return out


def indexed_groups(
    tensors: Sequence[torch.Tensor],
) -> list[tuple[list[int], list[torch.Tensor], torch.device]]:
    """Positions and members of each (device, dtype) group of ``tensors``."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return [([*idx], [tensors[i] for i in idx], dev) for (dev, _), idx in groups.items()]


def device_groups(tensors: Sequence[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.device]]:
    """Members and device of each (device, dtype) group of ``tensors``."""
    return [(members, dev) for _, members, dev in indexed_groups(tensors)]


def use_foreach(
    tensors: Sequence[torch.Tensor], device: torch.device, foreach: bool | None
) -> bool:
    """Whether to take the fused ``torch._foreach_*`` path (torch's own rule when None)."""
    if foreach is None:
        return _has_foreach_support(cast("list[torch.Tensor]", tensors), device)  # only iterated
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors; "
            "pass foreach=None or False"
        )
    return bool(foreach)


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


def mean_std(values: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation (over ``dim``, or all), as ``torch.std_mean``.

    Two fast reductions, the mean and the norm of the deviations from it: on CPU
    ``torch.std_mean``'s Welford pass measured ~20x slower on a 131k-element tensor.

    Example:
        >>> mean, std = mean_std(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> round(float(mean), 6), round(float(std), 6)
        (2.5, 1.118034)
    """
    if dim is None:
        mean = values.mean()
        n = values.numel()
        deviation = torch.linalg.vector_norm(values - mean)
    else:
        mean = values.mean(dim)
        n = values.shape[dim]
        deviation = torch.linalg.vector_norm(values - mean.unsqueeze(dim), dim=dim)
    return mean, deviation / max(n, 1) ** 0.5


def stack_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-d tensors into one float64 vector on ``device``."""
    first = tensors[0]
    if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        return torch.stack(list(tensors)).to(device=device, dtype=torch.float64)  # 2 kernels
    return torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors])


def segment_sqrt_sum_sq(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """``out[k] = sqrt(sum_{i: segments[i]==k} values[i]^2)`` (L2 norm of a group of norms)."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add_(0, segments, values * values).sqrt_()


def segment_max(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """``out[k] = max_{i: segments[i]==k} values[i]`` (NaN propagates)."""
    out = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, segments, values, reduce="amax", include_self=True)


#: Tensors up to this many elements are stacked by shape and reduced as one matrix: on CPU
#: ``torch._foreach_norm`` costs ~5 us per tensor, so a 1000-layer net paid milliseconds.
STACK_NUMEL = 1 << 14


@dataclass(frozen=True)
class ReducePlan:
    """How :func:`norms_and_maxes` groups a list of tensors: worked out once per layout.

    Attributes:
        stacks: Positions of small tensors of one shape and dtype, one stack each.
        large: Positions of the tensors reduced one by one (fused where torch can).
        order: For each input position, its place in the concatenated results
            (``stacks`` in turn, then ``large``); None when that is the input order.
    """

    stacks: tuple[tuple[int, ...], ...]
    large: tuple[int, ...]
    order: torch.Tensor | None


def reduce_plan(tensors: Sequence[torch.Tensor], device: torch.device) -> ReducePlan:
    """How :func:`norms_and_maxes` groups ``tensors`` (by shape, dtype and device)."""
    stacks: dict[tuple, list[int]] = {}
    large: list[int] = []
    for i, t in enumerate(tensors):
        if 0 < t.numel() <= STACK_NUMEL:
            stacks.setdefault((t.shape, t.dtype, t.device), []).append(i)
        else:
            large.append(i)
    flat = [i for idx in stacks.values() for i in idx] + large
    order = None
    if flat != list(range(len(flat))):
        place = [0] * len(flat)
        for k, i in enumerate(flat):
            place[i] = k
        order = torch.tensor(place, device=device)
    return ReducePlan(tuple(tuple(idx) for idx in stacks.values()), tuple(large), order)


def norms_and_maxes(
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    norms: bool = True,
    plan: ReducePlan | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """L2 norm and ``max |t|`` of each tensor, as two float64 vectors on ``device``.

    The L2 norms are float32 sums of squares (half precision upcast), as
    :func:`foreach_norms` with ``upcast``; NaN propagates into both. Small tensors
    of one shape are stacked and reduced in one kernel each, large ones go
    through ``torch._foreach_norm`` and ``torch.aminmax``. With ``norms=False``
    only the maxima are computed (the first result is None). DTensors give their
    local pieces' (see :mod:`gradmedic.sharding`). ``plan``: the grouping from
    :func:`reduce_plan` for tensors of this layout, kept by a caller that reduces
    the same layout every step (None: worked out now).
    """
    tensors = local_tensors(tensors)
    if plan is None:
        plan = reduce_plan(tensors, device)
    l2_parts: list[torch.Tensor] = []
    max_parts: list[torch.Tensor] = []
    with torch.no_grad():  # no per-tensor detach(): ~1 us each on a 1000-tensor list
        for idx in plan.stacks:
            mat = torch.stack([tensors[i] for i in idx]).reshape(len(idx), -1)
            max_parts.append(mat.abs().amax(1).to(device))  # small: |mat| costs little
            if norms:
                half = mat.dtype in (torch.float16, torch.bfloat16)
                vals = torch.linalg.vector_norm(mat, dim=1, dtype=torch.float32 if half else None)
                l2_parts.append(vals.to(device))
        if plan.large:
            members = [tensors[i] for i in plan.large]
            max_parts.append(abs_maxes(members, device))
            if norms:
                l2_parts.append(stack_on(foreach_norms(members, upcast=True), device))
        return _ordered(l2_parts, plan) if norms else None, _ordered(max_parts, plan)


def _ordered(parts: list[torch.Tensor], plan: ReducePlan) -> torch.Tensor:
    """The parts, concatenated as one float64 vector, back in input order."""
    same = all(p.dtype == parts[0].dtype for p in parts)
    flat = torch.cat(parts) if same else torch.cat([p.double() for p in parts])
    flat = flat.to(torch.float64)
    return flat if plan.order is None else flat[plan.order]
