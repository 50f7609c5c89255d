"""Per-parameter and per-layer gradient norms in one fused pass over all gradients."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any, cast

import torch

from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.sharding import (
    Deferred,
    any_dtensor,
    flat_shard_layout,
    fsdp1_group,
    local_tensors,
    sharded_record,
    version_of,
    without_partial,
)
from gradmedic.tensorlists import (
    ReducePlan,
    foreach_norms,
    l2_norms,
    norms_and_maxes,
    reduce_plan,
    stack_on,
)

_GRAD = attrgetter("grad")
_VERSION = attrgetter("_version")
#: max |g| below this (2^-60): a float32 sum of squares may have lost the gradient.
_TINY = 2.0**-60
#: Gradient dtypes whose clip norms the probe reads itself (torch's own CPU norms).
_EXACT = (torch.float32, torch.float64)


class GradientProbe(Probe):
    """L2 norm and max |g| of each parameter's and each layer's gradient.

    Reads ``p.grad`` of every parameter at record time: no hooks, one
    ``torch._foreach_norm`` per (device, dtype) for the L2 norms and one for
    the max norms. Layers whose parameters have no gradient this step
    (frozen, unused) are left out of the record.

    A gradmedic clipping call made before the record hands its pre-clip norms
    over (:meth:`offer_norms`), so clipping plus monitoring reads the
    gradients once.

    What the end of backward reads is what the record will use: once a step's
    gradients changed before the record (a clip in the loop), later snapshots take
    the L2 norms only (the post-clip max |g| is read at the record anyway). The clip
    itself always computes its own norms: whether a gradient was edited in between
    (through ``.data``, which has its own version counter, or by DDP's in-place
    all-reduce) cannot be known without reading it, and training must come out
    the same watched or not.

    Pre-clip norms, whoever clips: the monitor calls :meth:`snapshot` at the
    end of each backward pass. If nothing changed the gradients in place
    before the record (their version counters tell), the record reuses those
    norms; otherwise (clipping, loss unscaling) it reads the gradients again
    and also records the snapshot as ``pre_clip_grad_norm``, divided by
    ``loss_scale`` when a GradScaler scaled the loss.
    """

    name = "gradients"

    def __init__(self) -> None:
        self.index: LayerIndex | None = None
        self._offered: _Offer | None = None
        #: The last record took the gradmedic clip's norms: the next snapshot reads none.
        self._clip_reads = False
        #: The grouping of the last gradients a clip handed over, keyed by their parameters.
        self._clip_plan: tuple[tuple[int, ...], ReducePlan] | None = None
        self._snapshot: _Snapshot | None = None
        #: The global norm of the last collected step, a 0-d tensor on the gradients' device.
        self.last_total: torch.Tensor | None = None
        #: Set by the monitor before :meth:`collect`: the GradScaler's scale, if any.
        self.loss_scale: torch.Tensor | None = None
        #: How the gradients of the last-seen positions are grouped for the fused pass.
        self._plan: tuple[tuple[int, tuple[int, ...]], ReducePlan] | None = None
        #: The last record found the gradients changed since the backward pass.
        self._expect_change = False

    def attach(self, index: LayerIndex) -> None:
        """Remember the layer index (no hooks needed)."""
        self.index = index

    def offer_norms(
        self,
        grads: list[torch.Tensor],
        norms: list[torch.Tensor],
        scale: torch.Tensor,
        maxes: torch.Tensor | None = None,
    ) -> None:
        """Take L2 norms (and max |g|) already computed for ``grads``, then scaled by ``scale``."""
        self._offered = _Offer([id(g) for g in grads], norms, scale, maxes)

    def read_for_clip(
        self, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """A norm clip's pre-clip L2 norms and this probe's max |g|, in one read of ``grads``.

        The norms are the ones torch's clip computes on CPU (one ``linalg.vector_norm``
        per gradient, float32 or float64), so clipping comes out the same watched or
        not; each large gradient's max and min are read right after its norm, while it is
        in cache (small gradients of one shape are stacked for their maxima, and their
        norms taken one by one again: a second read, of small tensors only). None (the clip
        reads its own norms) for anything else: an accelerator's
        fused norms, half precision, sharded gradients. A record that reuses these (scaled
        by the clip's factor) reads nothing more, and the next snapshot reads nothing.
        """
        dtype = grads[0].dtype if grads else None
        if dtype not in _EXACT or any_dtensor(grads):
            return None
        if not all(g.device.type == "cpu" and g.dtype == dtype for g in grads):
            return None
        device = grads[0].device
        key = tuple(map(id, params))
        if self._clip_plan is None or self._clip_plan[0] != key:
            self._clip_plan = (key, reduce_plan(grads, device))
        plan = self._clip_plan[1]
        l2, amax = norms_and_maxes(grads, device, True, plan)
        norms = list(cast(torch.Tensor, l2).unbind())
        stacked = [i for idx in plan.stacks for i in idx]
        if stacked:  # a stack's norms are one reduction over the stack: per gradient instead
            for i, n in zip(stacked, foreach_norms([grads[i] for i in stacked]), strict=True):
                norms[i] = n
        return norms, amax

    def snapshot(self) -> None:
        """Read the per-parameter L2 norms and maxima now (the end of a backward pass)."""
        positions, grads = self._picked()
        if not grads or self.index is None:
            self._snapshot = None
            return
        device = grads[0].device
        l2: torch.Tensor | None = None
        amax: torch.Tensor | None = None
        if self._clip_reads:  # gradmedic's clip reads them before the record: only identities
            pass
        elif not self._expect_change:
            l2, amax = self._norms(grads, device, positions=positions)
        else:  # changed before the record: only the pre-clip norms are of use now
            l2 = l2_norms(grads, device, self._plan_for(grads, device, positions))
        params = self.index.params
        # FSDP1 records its flat slices without the snapshot: hold no gradient for it
        held = () if fsdp1_group(self.index.model) is not None else tuple(grads)
        self._snapshot = _Snapshot(
            params,
            positions,
            held,
            tuple(
                (params[i], id(g), version_of(g))
                for i, g in ((positions[0], grads[0]), (positions[-1], grads[-1]))
            ),
            l2,
            amax,
            _versions(held),
        )

    def changed_since_snapshot(self) -> bool:
        """Whether a gradient was replaced, cleared or modified in place since the snapshot.

        The first and the last gradient's identity and every gradient's version
        counter tell (:meth:`_same_grads` checks every gradient's identity when it
        matters). An edit through ``.data`` (its own counter) is not seen.
        """
        snap = self._snapshot
        if snap is None:
            return False
        for param, ident, version in snap.sentinels:
            g = param.grad
            if g is None or id(g) != ident or version_of(g) != version:
                return True
        # one gradient edited in place (a layer frozen for a step): every counter, C loops
        return bool(snap.versions) and _versions(snap.grads) != snap.versions

    def snapshot_finite(self) -> bool | None:
        """Whether the snapshot's gradients were all finite (None: it read no norms).

        One host read: called only for a backward pass no step followed.
        """
        snap = self._snapshot
        if snap is None or snap.norms is None:
            return None
        return bool(torch.isfinite(snap.norms).all())

    def _same_grads(self, snap: _Snapshot) -> bool:
        """Whether every parameter still holds the gradient tensor the snapshot read.

        A gradient set to None or replaced in the middle of the list (a layer frozen
        for one step) is caught here; one that appears where there was none, without
        a backward pass, is not looked for.
        """
        params = snap.params
        if len(snap.positions) < len(params):
            params = map(params.__getitem__, snap.positions)  # type: ignore[assignment]
        return all(map(is_, map(_GRAD, params), snap.grads))  # C loops: 80 -> 25 us per 1000

    def _aligned(self) -> _Snapshot | None:
        """The snapshot in the index's current parameter order.

        The first record orders the layers as their forwards ran, which rebuilds
        ``index.params``: the snapshot's positions and vectors are mapped onto the new
        list by parameter identity (once; None if a parameter left the index).
        """
        snap, index = self._snapshot, self.index
        if snap is None or index is None or snap.params is index.params:
            return snap
        where = {id(p): i for i, p in enumerate(index.params)}
        found = [where.get(id(snap.params[i])) for i in snap.positions]
        if any(i is None for i in found):
            return None
        moved = cast("list[int]", found)
        order = sorted(range(len(moved)), key=lambda k: moved[k])
        read = snap.norms if snap.norms is not None else snap.maxes
        take = torch.tensor(order, device=None if read is None else read.device)
        grads = tuple(snap.grads[k] for k in order)
        snap = _Snapshot(
            index.params,
            tuple(moved[k] for k in order),
            grads,
            snap.sentinels,  # as read at the end of backward: a change since still shows
            None if snap.norms is None else snap.norms[take],
            None if snap.maxes is None else snap.maxes[take],
            tuple(snap.versions[k] for k in order) if snap.versions else (),
        )
        self._snapshot = snap
        return snap

    def reset(self) -> None:
        """Drop norms offered or snapshotted for the finished step."""
        self._offered = None
        self._snapshot = None
        self.loss_scale = None

    def _picked(self) -> tuple[tuple[int, ...], list[torch.Tensor]]:
        """Positions (in the index) and tensors of the gradients that exist now."""
        if self.index is None:
            return (), []
        grads = list(map(_GRAD, self.index.params))  # one read of each .grad
        positions = tuple(compress(range(len(grads)), map(is_not, grads, repeat(None))))
        if len(positions) < len(grads):
            grads = [grads[i] for i in positions]
        return positions, grads

    def _norms(
        self,
        grads: list[torch.Tensor],
        device: torch.device,
        norms: bool = True,
        positions: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The one place per-parameter statistics are computed from the gradient list.

        Vectors on ``device`` (see :func:`norms_and_maxes`): L2 norms (float32 sums of
        squares; None unless ``norms``) and max ``|g|``. ``positions`` (of the gradients'
        parameters in the index) keys the cached grouping: a gradient has its parameter's
        shape, dtype and device, so the same positions always group the same way.
        """
        return norms_and_maxes(grads, device, norms, self._plan_for(grads, device, positions))

    def _plan_for(
        self, grads: list[torch.Tensor], device: torch.device, positions: tuple[int, ...] | None
    ) -> ReducePlan | None:
        """The cached grouping of gradients at ``positions`` (None: none given, work it out)."""
        if positions is None or self.index is None:
            return None
        key = (id(self.index.params), positions)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, reduce_plan(local_tensors(grads), device))
        return self._plan[1]

    def collect(self, step: int) -> dict[str, Any]:
        """Gradient statistics of the current ``.grad`` tensors, as device tensors (no host read).

        Per step: the per-parameter L2 norms and max ``|g|`` and the global norm;
        everything per layer, whether every gradient is finite (from max ``|g|``,
        into which NaN/Inf propagate), and the rare cases a float32 pass cannot
        settle, are derived when the record is read (:class:`_GradientStats`).
        """
        index = self.index
        if index is not None and fsdp1_group(index.model) is not None:
            return self._collect_flat_shards(index)  # FSDP1: every rank its flat slices
        # GradScaler unscales in place without bumping version counters: with a loss
        # scale, the gradients are always read again.
        changed = self.loss_scale is not None or self.changed_since_snapshot()
        # What the next snapshot reads: loops keep their shape from step to step.
        self._expect_change = changed
        snap = self._aligned()
        unchanged = (
            snap is not None and snap.norms is not None and not changed and self._same_grads(snap)
        )
        if unchanged:  # the gradients the backward pass left, as the snapshot listed them
            pos, grads = snap.positions, list(snap.grads)  # type: ignore[union-attr]
        else:
            pos, grads = self._picked()
            if snap is not None and snap.positions != pos:
                snap = None  # gradients appeared or vanished since the backward pass
        if index is None or not grads:
            return {}
        device = grads[0].device
        if any_dtensor(grads):  # sharded: local statistics now, reduced when the record is read
            return self._collect_sharded(index, pos, grads, snap, unchanged)
        pre: torch.Tensor | None = None
        offered = None if unchanged else self._offered_stats(grads, device)
        if unchanged:
            l2, inf = snap.norms, snap.maxes  # type: ignore[union-attr]
            if inf is None:  # the snapshot took the L2 norms only: a change was expected
                inf = self._norms(grads, device, False, pos)[1]
        elif offered is None:
            computed, inf = self._norms(grads, device, True, pos)
            l2, pre = cast(torch.Tensor, computed), self._pre_clip(snap, device)
        else:  # as the clip read them before it scaled them
            l2, inf, pre = offered
            if inf is None:
                inf = self._norms(grads, device, False, pos)[1]
        # a clip that read the maxima too will read them again: the next snapshot reads none
        self._clip_reads = offered is not None and offered[1] is not None
        # Per step only the per-parameter vectors and the global norm (for the norm-jump
        # rule) are computed; per-layer values and flags are derived when read.
        total = torch.linalg.vector_norm(l2, dtype=torch.float64)  # no overflow of the sum
        self.last_total = total
        out: dict[str, Any] = {
            "global_grad_norm": total,
            "_grad_l2": l2,
            "_grad_max": inf,
            "_gradient_stats": _GradientStats(index, pos, grads[0], grads[-1]),
        }
        if pre is not None:
            out["_grad_pre"] = pre
            out["pre_clip_global_grad_norm"] = torch.linalg.vector_norm(pre, dtype=torch.float64)
        return out

    def _collect_flat_shards(self, index: LayerIndex) -> dict[str, Any]:
        self.last_total = None  # known only when read: the norm-jump rule stays off
        pos = tuple(i for i, p in enumerate(index.params) if p.requires_grad)
        names, seg = index.segments(pos, torch.device("cpu"))
        # a rank owning no slice of a parameter has no .grad: zeros keep every rank's list alike
        params = [index.params[i] for i in pos]
        grads = [p.grad if p.grad is not None else p.detach().new_zeros(0) for p in params]
        l2, inf = self._norms(grads, grads[0].device)
        layout = flat_shard_layout(len(grads), fsdp1_group(index.model))
        qualified = tuple(index.param_names[i] for i in pos)
        return sharded_record(grads, l2, inf, None, seg, names, qualified, layout)  # type: ignore[arg-type]

    def _pre_clip(self, snap: _Snapshot | None, device: torch.device) -> torch.Tensor | None:
        """The snapshot's norms as pre-clip norms on ``device`` (unscaled by a GradScaler's)."""
        if snap is None or snap.norms is None:
            return None
        pre = snap.norms.to(device)
        if self.loss_scale is not None:
            pre = pre / self.loss_scale.to(device=device, dtype=pre.dtype)
        return pre

    def _collect_sharded(
        self,
        index: LayerIndex,
        pos: tuple[int, ...],
        grads: list[torch.Tensor],
        snap: _Snapshot | None,
        unchanged: bool,
    ) -> dict[str, Any]:
        self.last_total = None  # known only when read: the norm-jump rule stays off
        names, seg = index.segments(pos, torch.device("cpu"))
        grads = without_partial(grads)
        pre = None
        if unchanged and snap is not None and snap.norms is not None:
            l2, inf = snap.norms, snap.maxes  # the local pieces', read at the end of backward
            if inf is None:  # the snapshot took the L2 norms only: a change was expected
                inf = self._norms(grads, grads[0].device, False)[1]
        else:
            computed, inf = self._norms(grads, grads[0].device)
            l2 = cast(torch.Tensor, computed)  # norms=True: always computed
            pre = self._pre_clip(snap, grads[0].device)
        params = tuple(index.param_names[i] for i in pos)
        return sharded_record(grads, l2, inf, pre, seg, names, params)

    def _offered_stats(
        self, grads: list[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """What a gradmedic clip read of exactly these gradients, as vectors on ``device``.

        The post-clip L2 norms, the post-clip max |g| (None unless the clip read them)
        and the pre-clip norms. Scaling every element by one factor ``s >= 0`` scales
        its norm and its max |g| by ``s`` (NaN propagating), so the clip's reading stands
        for the gradients it left.
        """
        offered = self._offered
        if offered is None:
            return None
        where = {ident: k for k, ident in enumerate(offered.ids)}
        if len(where) != len(offered.ids) or not all(id(g) in where for g in grads):
            return None
        take = [where[id(g)] for g in grads]
        pre = stack_on([offered.norms[k] for k in take], device)
        scale = torch.as_tensor(offered.scale, device=device)
        maxes = None
        if offered.maxes is not None:
            picked = offered.maxes.to(device)
            if take != list(range(len(offered.ids))):
                picked = picked[torch.tensor(take, device=device)]
            maxes = picked * scale.to(picked.dtype)
        return pre * scale.to(pre.dtype), maxes, pre

    def detach(self) -> None:
        """Nothing to remove."""
        self.index = None
        self.reset()


@dataclass(frozen=True)
class _Offer:
    """What a gradmedic clip read of the gradients before it scaled them by ``scale``."""

    ids: list[int]
    norms: list[torch.Tensor]
    scale: torch.Tensor
    #: max |g| of each, when the clip read them (:meth:`GradientProbe.read_for_clip`).
    maxes: torch.Tensor | None


@dataclass(frozen=True)
class _Snapshot:
    """Per-parameter norms read at the end of a backward pass, and what they were read from."""

    #: The index's parameter list the positions refer to (rebuilt when layers are reordered).
    params: list[torch.nn.Parameter]
    positions: tuple[int, ...]
    #: The gradients read (held until the step is recorded or abandoned).
    grads: tuple[torch.Tensor, ...]
    #: ``(parameter, id of its gradient, version counter)``, first and last gradient read.
    sentinels: tuple[tuple[torch.nn.Parameter, int, int], ...]
    #: None when nothing was read (gradmedic's clip reads them before the record).
    norms: torch.Tensor | None
    #: None when only the L2 norms were read (the gradients were expected to change).
    maxes: torch.Tensor | None
    #: The version counter of each of ``grads`` when read.
    versions: tuple[int, ...] = ()


class _GradientStats(Deferred):
    """A step's per-layer gradient entries, derived from the per-parameter vectors on read.

    Also settles what the step's float32 pass could not: when a gradient holds a
    NaN/Inf, or its sum of squares overflowed or underflowed (entries near 1e28 or
    1e-26), and the step's gradients are still the ones recorded (same first and
    last tensor, same version counters: the record is read before the next
    backward, as ``monitor.step()`` followed by ``history.rows()`` does), their
    norms are taken again in float64 and their NaN/Inf elements counted. Otherwise
    the float32 norms stay, except where a finite gradient's sum of squares under- or
    overflowed: that norm is its max |g|, a lower bound within sqrt(numel) of it (never
    0 for a gradient that is not zero, never inf for a finite one), and the global
    norm is summed again from them; ``grad_nonfinite`` counts the gradients holding a
    NaN/Inf (a lower bound on the elements) and ``grad_nonfinite_exact`` is False.
    """

    def __init__(
        self, index: LayerIndex, positions: tuple[int, ...], first: torch.Tensor, last: torch.Tensor
    ) -> None:
        self.index, self.positions = index, positions
        # as ordered now (a reorder rebuilds these, it does not change them); per layer on read
        self.param_layer, self.layer_names = index.param_layer, index.names
        self.sentinels = [(weakref.ref(t), t._version) for t in (first, last)]

    def fill(self, row: dict[str, Any]) -> None:
        """Write the per-layer and per-parameter gradient entries into ``row``."""
        l2: list[float] = row.pop("_grad_l2")
        amax: list[float] = row.pop("_grad_max")
        pre: list[float] | None = row.pop("_grad_pre", None)
        bad = [0 if m < math.inf else 1 for m in amax]  # NaN and inf fail the test
        finite = not any(bad)
        recheck = not finite or any(
            (0 < m < _TINY) or (m < math.inf and not n < math.inf)
            for n, m in zip(l2, amax, strict=True)
        )
        exact = self._exact() if recheck else None
        if exact is not None:
            l2, bad = exact
            row["global_grad_norm"] = math.sqrt(sum(v * v for v in l2))
        else:
            if recheck:  # a float32 sum of squares that under- or overflowed: ||g|| >= max|g|
                bounded = [_bounded(n, m) for n, m in zip(l2, amax, strict=True)]
                if bounded != l2:
                    l2 = bounded
                    row["global_grad_norm"] = math.sqrt(sum(v * v for v in l2))
            if not finite:
                row["grad_nonfinite_exact"] = False
        layers = [self.param_layer[i] for i in self.positions]
        names = [self.layer_names[k] for k in sorted(set(layers))]
        rank = {k: j for j, k in enumerate(sorted(set(layers)))}
        seg = [rank[k] for k in layers]
        row["grad_norm"] = dict(zip(names, _root_sum_sq(l2, seg, len(names)), strict=True))
        row["grad_max"] = dict(zip(names, _seg_max(amax, seg, len(names)), strict=True))
        params = [self.index.param_names[i] for i in self.positions]
        row["param_grad_norm"] = dict(zip(params, l2, strict=True))
        counts = [0] * len(names)
        for k, b in zip(seg, bad, strict=True):
            counts[k] += b
        row["grad_nonfinite"] = dict(zip(names, counts, strict=True))
        row["_grads_finite"] = finite
        if pre is not None:
            row["pre_clip_grad_norm"] = dict(
                zip(names, _root_sum_sq(pre, seg, len(names)), strict=True)
            )

    def _exact(self) -> tuple[list[float], list[int]] | None:
        """Float64 norms and NaN/Inf counts, if the gradients are still the recorded ones."""
        params = self.index.params
        if max(self.positions) >= len(params):
            return None
        grads = [params[i].grad for i in self.positions]
        for g, (ref, version) in zip((grads[0], grads[-1]), self.sentinels, strict=True):
            if g is None or ref() is not g or g._version != version:
                return None
        if any(g is None for g in grads):
            return None
        present = [g for g in grads if g is not None]
        device = present[0].device
        l2 = stack_on(foreach_norms(present, wide=True), device).tolist()
        bad = torch.stack([(~torch.isfinite(g)).sum() for g in present]).tolist()
        return l2, bad


def _root_sum_sq(values: list[float], seg: list[int], n: int) -> list[float]:
    sums = [0.0] * n
    for k, v in zip(seg, values, strict=True):
        sums[k] += v * v
    return [math.sqrt(v) for v in sums]


def _seg_max(values: list[float], seg: list[int], n: int) -> list[float]:
    out = [-math.inf] * n
    for k, v in zip(seg, values, strict=True):
        out[k] = v if math.isnan(v) or math.isnan(out[k]) else max(out[k], v)
    return out


def _bounded(norm: float, biggest: float) -> float:
    """``norm``, or ``biggest`` (max |g|) where a finite gradient's float32 norm failed."""
    if norm < biggest < math.inf or (math.isinf(norm) and biggest < math.inf):
        return biggest
    return norm


def _versions(grads: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """Every gradient's in-place version counter (of its local piece for a DTensor)."""
    return tuple(map(_VERSION, local_tensors(grads)))
