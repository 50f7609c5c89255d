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


def extrema(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t.max(), t.min())`` as 0-d tensors, read the fastest way for ``t``'s device.

    On CPU two plain reductions beat one ``torch.aminmax`` on a large tensor (18 vs
    26 us on 131k floats), one ``aminmax`` is faster on a small one, where a dispatch
    costs more than the pass (1.6 vs 2.7 us on 2k floats). On an accelerator, where a
    reduction is a memory pass and a kernel launch, one ``aminmax`` reads it once.
    """
    if t.is_complex():  # ordered by modulus: max |t| is what the callers take from these
        t = t.abs()
    if t.device.type == "cpu" and t.numel() > ONE_PASS_NUMEL:
        return t.amax(), t.amin()
    lo, hi = torch.aminmax(t)
    return hi, lo


#: On CPU, tensors up to this many elements get their max and min from one ``aminmax``.
ONE_PASS_NUMEL = 1 << 14


def _large_stats(
    tensors: Sequence[torch.Tensor], device: torch.device, norms: bool, maxima: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2 norms (float32 sums, half upcast; if ``norms``) and ``max |t|`` (if ``maxima``).

    ``max |t|`` is ``max(|max t|, |min t|)`` from :func:`extrema`: several times faster
    than an infinity norm (``torch._foreach_norm(ts, inf)`` or ``vector_norm(t, inf)``)
    on CPU, and no ``|t|`` is allocated. NaN propagates into both.

    A tensor of :data:`BACK_TO_BACK` elements or more has its norm, max and min taken
    one after the other, while it is still in cache (on a 20-layer MLP of 512 x 512
    weights, cold: 1.7 vs 2.0 ms for a fused norm pass followed by the extrema);
    smaller ones (every one, without maxima) get their norms from one fused
    ``torch._foreach_norm``. The results are vectors on ``device``.
    """
    if not maxima:
        return stack_on(foreach_norms(tensors, upcast=True), device, dtype=None), None
    l2: list[torch.Tensor | None] = [None] * len(tensors)
    fused = [k for k, t in enumerate(tensors) if t.numel() < BACK_TO_BACK] if norms else []
    if fused:
        norms_fused = foreach_norms([tensors[k] for k in fused], upcast=True)
        for k, n in zip(fused, norms_fused, strict=True):
            l2[k] = n
    maxs, mins = [], []
    for k, t in enumerate(tensors):
        if not t.numel():
            t = t.new_zeros(1)  # no_grad (the caller's): no per-tensor detach needed
        if norms and l2[k] is None:
            half = t.dtype in (torch.float16, torch.bfloat16)
            l2[k] = torch.linalg.vector_norm(t, dtype=torch.float32 if half else None)
        hi, lo = extrema(t)
        maxs.append(hi)
        mins.append(lo)
    # four kernels for the whole list: stack, |.|, the larger of each (max, min) pair
    amax = stack_on(maxs + mins, device, dtype=None).abs_().view(2, -1).amax(0)
    return (stack_on(l2, device, dtype=None) if norms else None), amax  # type: ignore[arg-type]


#: Tensors this large are reduced one at a time, each statistic while it is in cache.
BACK_TO_BACK = 1 << 18


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


def stack_on(
    tensors: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """Stack 0-d tensors into one vector on ``device``, of ``dtype`` (None: their promoted one).

    One kernel when they all are on ``device`` and no conversion is asked, two with one.
    """
    if all(t.device == device for t in tensors):
        stacked = torch.stack(list(tensors))
        return stacked if dtype is None else stacked.to(dtype)
    return torch.stack([t.to(device=device, dtype=dtype) for t in tensors])


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
        stacks: Positions of small tensors of one shape and dtype, one stack each
            (a shape no other tensor has goes with the large ones, unless it is alone).
        large: Positions of the tensors reduced one by one (fused where torch can).
        order: For each input position, its place in the concatenated results
            (``stacks`` in turn, then ``large``); None when that is the input order.
        order_both: ``order`` for the L2 norms and the maxima concatenated, as two
            rows (gathers both into input order at once); None with ``order``.
    """

    stacks: tuple[tuple[int, ...], ...]
    large: tuple[int, ...]
    order: torch.Tensor | None
    order_both: torch.Tensor | None = None
    #: Positions of complex tensors: reduced through their modulus (same L2 norm, max |t|).
    complex: tuple[int, ...] = ()


def reduce_plan(tensors: Sequence[torch.Tensor], device: torch.device) -> ReducePlan:
    """How :func:`norms_and_maxes` groups ``tensors`` (by shape, dtype and device)."""
    stacks: dict[tuple, list[int]] = {}
    large: list[int] = []
    for i, t in enumerate(tensors):
        if 0 < t.numel() <= STACK_NUMEL:
            stacks.setdefault((t.shape, t.dtype, t.device), []).append(i)
        else:
            large.append(i)
    singles = [idx[0] for idx in stacks.values() if len(idx) == 1]
    if len(singles) > 1 or (singles and large):
        # A stack of one costs four kernels (stack, |.|, max, norm); among the large ones a
        # tensor costs one (its extrema; the norm is fused), the large path's own four once.
        stacks = {key: idx for key, idx in stacks.items() if len(idx) > 1}
        large = sorted(large + singles)
    flat = [i for idx in stacks.values() for i in idx] + large
    order = both = None
    if flat != list(range(len(flat))):
        place = [0] * len(flat)
        for k, i in enumerate(flat):
            place[i] = k
        order = torch.tensor(place, device=device)
        both = torch.stack([order, order + len(flat)])
    moduli = tuple(i for i, t in enumerate(tensors) if t.is_complex())
    stacked = tuple(tuple(idx) for idx in stacks.values())
    return ReducePlan(stacked, tuple(large), order, both, moduli)


def norms_and_maxes(
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    norms: bool = True,
    plan: ReducePlan | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """L2 norm and ``max |t|`` of each tensor, as two vectors on ``device``.

    The L2 norms are float32 sums of squares (half precision upcast), as
    :func:`foreach_norms` with ``upcast``; NaN propagates into both. The vectors
    have the results' promoted dtype (float32 for float32 or half tensors, float64
    when any tensor is): a wider one would hold nothing more. Small tensors of one
    shape are stacked and reduced in one kernel each, large ones go through
    ``torch._foreach_norm`` and :func:`extrema`. With ``norms=False`` only the
    maxima are computed (the first result is None). DTensors give their local
    pieces' (see :mod:`gradmedic.sharding`). ``plan``: the grouping from
    :func:`reduce_plan` for tensors of this layout, kept by a caller that reduces
    the same layout every step (None: worked out now).
    """
    l2, amax = _reduce(tensors, device, norms, True, plan)
    assert amax is not None
    return l2, amax


def l2_norms(
    tensors: Sequence[torch.Tensor], device: torch.device, plan: ReducePlan | None = None
) -> torch.Tensor:
    """The L2 norms of :func:`norms_and_maxes` alone (no maxima), one vector on ``device``."""
    l2, _ = _reduce(tensors, device, True, False, plan)
    assert l2 is not None
    return l2


def _reduce(
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    norms: bool,
    maxima: bool,
    plan: ReducePlan | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    tensors = local_tensors(tensors)
    if plan is None:
        plan = reduce_plan(tensors, device)
    if plan.complex:
        tensors = list(tensors)
        for i in plan.complex:
            tensors[i] = tensors[i].abs()
    l2s: list[torch.Tensor] = []  # per group, one entry per tensor
    maxes: list[torch.Tensor] = []
    with torch.no_grad():  # no per-tensor detach(): ~1 us each on a 1000-tensor list
        for idx in plan.stacks:
            mat = torch.stack([tensors[i] for i in idx])
            if mat.dim() == 1:  # 0-d tensors: one column each
                mat = mat.unsqueeze(1)
            dims = tuple(range(1, mat.dim()))  # reduced in place: no reshape kernel
            if maxima and mat.numel() <= _ABS_TEMPORARY:
                maxes.append(mat.abs().amax(dims))
            elif maxima:  # max(max, -min): no |mat| temporary as large as the stack
                maxes.append(torch.maximum(mat.amax(dims), mat.amin(dims).neg_()))
            if norms:
                half = mat.dtype in (torch.float16, torch.bfloat16)
                wide = torch.float32 if half else None
                l2s.append(torch.linalg.vector_norm(mat, dim=dims, dtype=wide))
        if plan.large:
            large = [tensors[i] for i in plan.large]
            large_l2, amax = _large_stats(large, device, norms, maxima)
            if amax is not None:
                maxes.append(amax)
            if large_l2 is not None:
                l2s.append(large_l2)
        return _in_input_order(l2s, maxes, plan, device)


def _in_input_order(
    l2s: list[torch.Tensor], maxes: list[torch.Tensor], plan: ReducePlan, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The groups' L2 and max vectors (None where not computed), on ``device``, in input order.

    At most three kernels (one concatenation of both, one gather, one split); none
    for a single group in input order.
    """
    if any(p.device != device for p in l2s + maxes):
        l2s, maxes = [p.to(device) for p in l2s], [p.to(device) for p in maxes]

    def joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
        if not parts:
            return None
        whole = torch.cat(parts) if len(parts) > 1 else parts[0]
        return whole if plan.order is None else whole[plan.order]

    if plan.order is None or not (l2s and maxes):
        return joined(l2s), joined(maxes)
    l2, amax = torch.cat(l2s + maxes)[plan.order_both].unbind(0)  # one promoted dtype
    return l2, amax


#: A stack up to this many elements takes ``max |x|`` through ``|x|`` (two kernels, one
#: small temporary); a larger one through its max and min (no temporary).
_ABS_TEMPORARY = 1 << 16
