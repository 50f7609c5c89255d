"""Update size: ||delta w|| / ||w|| per layer, from a bounded copy of the parameters.

With an optimizer, ``before()`` runs in its step pre-hook and ``after()`` in
its post-hook. Without one, the monitor calls ``after()`` then ``before()``
at each ``step()``, so the update measured is the change since the previous
recorded step (one optimizer step when every step is recorded).

A measurement copies one *group* of layers, at most ``BUDGET_FRACTION`` of
the parameter elements (and never less than ``BUDGET_FLOOR`` elements, 64 KiB of
float32, so a small model is copied whole); successive scheduled measurements take the
groups in turn, so every layer is measured once per ``len(groups)``
scheduled steps. A layer larger than the budget alone is measured on a fixed
strided sample of each of its parameters (every ``stride``-th element):
``||dw||`` is the sample's norm times ``sqrt(numel / sample size)``, and
``||w||`` is always exact (a read of the whole parameter, no copy).

The first measurement also reads ``||w||`` of every layer (norms only, no copy):
the detectors set zero-initialized layers aside (LoRA B matrices, zero-init
residual branches, whose ratio is a division by zero), and they can only tell
such a layer from the record where its ``param_norm`` is 0.

Whether a step's measurement is kept can be a device tensor (the monitor's
norm-jump rule, decided without a host read): the record carries it as
``_updates_keep`` and drops the update entries on read when it is false.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.sharding import Deferred, local_tensors, whole_norms
from gradmedic.tensorlists import foreach_norms, stack_on

#: Extra memory a measurement may take, as a fraction of the parameters' elements ...
BUDGET_FRACTION = 0.05
#: ... but at least this many elements (64 KiB of float32): a small model is copied whole,
#: so every record measures all of its layers (a spike in one step is not missed because
#: another group was measured then); above 327,680 elements the 5% rule alone bounds it.
BUDGET_FLOOR = 1 << 14


#: A one-buffer group of up to this many parameters gets its norms from the copy's slices
#: (``torch._foreach_norm``); a larger one from one ``segment_reduce``. On CPU: 2 slices of
#: 87k elements 83 vs 219 us, 100 slices of 264 elements 179 vs 60 us.
FOREACH_SEGMENTS = 16


@dataclass(frozen=True)
class _Group:
    """Parameters measured together: positions in ``LayerIndex.params`` and sampling strides."""

    positions: tuple[int, ...]
    strides: tuple[int, ...]
    #: ``sqrt(numel / sample size)`` per parameter (1.0 where copied whole).
    scales: tuple[float, ...]


def plan_groups(index: LayerIndex, positions: tuple[int, ...]) -> list[_Group]:
    """Split the layers owning ``positions`` into groups of at most the copy budget."""
    params = local_tensors(index.params)  # sharded: this rank's pieces are copied
    by_layer: dict[int, list[int]] = {}
    for i in positions:
        by_layer.setdefault(index.param_layer[i], []).append(i)
    total = sum(params[i].numel() for i in positions)
    budget = max(BUDGET_FLOOR, math.ceil(BUDGET_FRACTION * total))
    groups: list[_Group] = []
    current: list[int] = []
    size = 0

    def close() -> None:
        nonlocal current, size
        if current:
            groups.append(_Group(tuple(current), (1,) * len(current), (1.0,) * len(current)))
        current, size = [], 0

    for layer_pos in by_layer.values():
        layer_size = sum(params[i].numel() for i in layer_pos)
        if layer_size > budget:
            close()
            base = math.ceil(layer_size / budget)
            strides = tuple(_coprime_stride(base, params[i]) for i in layer_pos)
            pairs = zip(layer_pos, strides, strict=True)
            counts = [len(range(0, params[i].numel(), s)) for i, s in pairs]
            scales = tuple(
                math.sqrt(params[i].numel() / c) if c else 1.0
                for i, c in zip(layer_pos, counts, strict=True)
            )
            groups.append(_Group(tuple(layer_pos), strides, scales))
            continue
        if size + layer_size > budget:
            close()
        current.extend(layer_pos)
        size += layer_size
    close()
    return groups


def _coprime_stride(stride: int, p: torch.Tensor) -> int:
    """The first stride >= ``stride`` coprime with the row length: the sample walks the columns."""
    row = p.shape[-1] if p.dim() > 1 else 1
    while math.gcd(stride, row) != 1:
        stride += 1
    return stride


def _one_buffer(views: list[torch.Tensor]) -> bool:
    """Whether the views can share one flat copy (one device, one dtype)."""
    first = views[0] if views else None
    return first is not None and all(
        v.dtype == first.dtype and v.device == first.device for v in views
    )


def _flat(local: torch.Tensor, stride: int) -> torch.Tensor:
    """A rank-local parameter flattened, or its strided sample (a view when contiguous)."""
    flat = local.detach().reshape(-1)
    return flat if stride == 1 else flat[::stride]


class UpdateProbe(Probe):
    """Parameter norm, update norm and update-to-weight ratio per layer."""

    name = "updates"

    def __init__(self) -> None:
        self.index: LayerIndex | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._group: _Group | None = None
        self._keep: bool | torch.Tensor = True
        self._plan: list[_Group] = []
        self._plan_key: tuple[int, tuple[int, ...]] | None = None
        self._turn = 0
        self._result: dict[str, Any] = {}
        self._all_norms: torch.Tensor | None = None
        self._scanned = False
        self._one = False  # the snapshot is one flat buffer
        self._stats: dict[_Group, _UpdateStats] = {}
        #: Per (what, group) of the plan, small device tensors made once (see _constant).
        self._constants: dict[tuple[str, _Group], torch.Tensor] = {}
        self._view_cache: (
            tuple[_Group, tuple[Any, ...], list[torch.Tensor], list[torch.Tensor]] | None
        ) = None

    def attach(self, index: LayerIndex) -> None:
        """Remember the layer index."""
        self.index = index

    def groups(self) -> list[_Group]:
        """The measurement groups for the parameters that currently require gradients."""
        if self.index is None:
            return []
        params = self.index.params
        positions = tuple(i for i, p in enumerate(params) if p.requires_grad)
        key = (id(params), positions)
        if key != self._plan_key:
            self._plan = plan_groups(self.index, positions) if positions else []
            self._plan_key, self._turn = key, 0
            self._stats, self._constants = {}, {}
        return self._plan

    def before(self, keep: bool | torch.Tensor = True, advance: bool = True) -> None:
        """Copy the next group's parameters (bounded); ``keep`` says whether the record keeps it.

        ``advance`` moves on to the next group afterwards (scheduled measurements);
        a measurement that may be dropped (``keep`` a device flag) does not.
        """
        # A possibly-dropped measurement (every step, for the norm-jump rule) keeps the plan
        # of the last scheduled one: which parameters require gradients is read on schedule.
        if self.index is None:
            return
        key = self._plan_key
        stale = advance or key is None or key[0] != id(self.index.params)
        plan = self.groups() if stale else self._plan
        if not plan:
            return
        group = plan[self._turn % len(plan)]
        if advance:
            self._turn = (self._turn + 1) % len(plan)
        params = self.index.params
        if not self._scanned:
            self._scanned = True
            every = [params[i].detach() for i in self._plan_key[1]] if self._plan_key else []
            with torch.no_grad():
                norms = stack_on(foreach_norms(local_tensors(every), upcast=True), every[0].device)
            (self._all_norms,) = whole_norms(every, norms)
        with torch.no_grad():
            _, views = self._views(group)
            self._one = _one_buffer(views)
            if self._one:  # one copy kernel, and one reduction of both statistics after
                self._snapshot = [torch.cat(views)]
            else:
                self._snapshot = list(torch._foreach_mul(views, 1.0))
        self._group, self._keep = group, keep

    def _views(self, group: _Group) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The group's rank-local parameters and their flat (sampled) views.

        Views of contiguous parameters are made once and reused while every
        parameter keeps its storage and layout (``p.data = ...`` or ``set_`` change them).
        """
        params = self.index.params  # type: ignore[union-attr]
        local = local_tensors([params[i] for i in group.positions])
        ptrs = tuple((t.data_ptr(), t.shape, t.stride()) for t in local)  # storage and layout
        cached = self._view_cache
        if cached is not None and cached[0] == group and cached[1] == ptrs:
            return cached[2], cached[3]
        full = [t.detach() for t in local]
        views = [_flat(t, st) for t, st in zip(full, group.strides, strict=True)]
        if all(t.is_contiguous() for t in full):  # then the flat views alias the parameters
            self._view_cache = (group, ptrs, full, views)
        return full, views

    def after(self) -> None:
        """Measure the change since :meth:`before` and keep it for :meth:`collect`."""
        index, snap, group = self.index, self._snapshot, self._group
        self._snapshot = None
        if index is None or snap is None or group is None or not index.params:
            return
        params = index.params
        if max(group.positions) >= len(params):
            return
        with torch.no_grad():
            full, views = self._views(group)
            device = full[0].device
            if self._one:
                upd, old = self._flat_norms(views, full, snap[0], group, device)
            else:
                diffs = torch._foreach_sub(views, snap)
                upd = stack_on(foreach_norms(diffs, upcast=True), device)
                # ||w|| before the step from the copy where whole; a sampled parameter's is
                # read from the whole tensor after the step (it differs by at most ||dw||).
                triples = zip(snap, full, group.strides, strict=True)
                whole = [s if st == 1 else p for s, p, st in triples]
                old = stack_on(foreach_norms(whole, upcast=True), device)
            if any(s != 1 for s in group.strides):
                upd = upd * self._constant("scales", group, group.scales, upd.device, upd.dtype)
            # sharded parameters: the local pieces' norms made the whole tensors' (a collective)
            upd, old = whole_norms([params[i] for i in group.positions], upd, old)
        # Per layer on read (_UpdateStats): per step only the per-parameter vectors.
        self._result = {
            "_update_norms": upd,
            "_update_params": old,
            "_update_stats": self._stats_of(index, group),
            "_updates_keep": self._keep,
        }
        if self._all_norms is not None and self._plan_key is not None:
            self._result["_param_norms_all"] = self._all_norms
            self._result["_param_norms_stats"] = _ParamNorms(index, self._plan_key[1])
            self._all_norms = None

    def _flat_norms(
        self,
        views: list[torch.Tensor],
        full: list[torch.Tensor],
        snap: torch.Tensor,
        group: _Group,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-parameter ``||dw||`` and ``||w||`` from the one-buffer copy.

        Only the copy ``snap`` is held across the optimizer step. With up to
        :data:`FOREACH_SEGMENTS` parameters, a transient difference buffer and the copy
        are split into per-parameter slices and normed in one fused call; with more, a
        transient ``(2, N)`` buffer takes the copy (row 0) and the difference (row 1),
        both rows squared in place and summed per parameter at once. Half precision is
        upcast to float32 sums, as ``foreach_norms`` with ``upcast`` takes them.
        """
        sizes = [v.numel() for v in views]
        if len(sizes) <= FOREACH_SEGMENTS:  # a few parameters: their slices' fused norms
            diff = torch.cat(views).sub_(snap)
            norms = foreach_norms([*diff.split(sizes), *snap.split(sizes)], upcast=True)
            upd, old = stack_on(norms, device).view(2, -1).unbind()
        else:  # many: one segmented sum of both rows (one kernel, not one per slice)
            lengths = self._constant("lengths", group, sizes, snap.device).expand(2, -1)
            pair = snap.new_empty((2, snap.numel()))
            torch.cat(views, out=pair[1])
            pair[1].sub_(snap)
            pair[0].copy_(snap)
            if pair.dtype in (torch.float16, torch.bfloat16):
                pair = pair.float()
            # unsafe: the lengths are the probe's own, so no host read to check them
            sums = torch.segment_reduce(pair.square_(), "sum", lengths=lengths, axis=1, unsafe=True)
            old, upd = sums.to(device, torch.float64).sqrt_().unbind()
        sampled = [p for p, st in zip(full, group.strides, strict=True) if st != 1]
        if sampled:  # a sampled parameter's ||w||: the whole tensor, after the step
            at = [k for k, st in enumerate(group.strides) if st != 1]
            where = self._constant("sampled", group, at, device)
            whole = stack_on(foreach_norms(sampled, upcast=True), device)
            old = old.index_copy(0, where, whole)
        return upd, old

    def _constant(
        self,
        what: str,
        group: _Group,
        values: Sequence[float],
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``values`` of ``group`` as a device tensor, copied to the device once per plan.

        A host-to-device copy of a Python list is a synchronizing copy on CUDA: made on
        every measurement, it would be a host sync per step.
        """
        made = self._constants.get((what, group))
        if made is None or made.device != device or (dtype is not None and made.dtype != dtype):
            made = self._constants[what, group] = torch.tensor(values, dtype=dtype, device=device)
        return made

    def _stats_of(self, index: LayerIndex, group: _Group) -> _UpdateStats:
        """The per-layer writer of ``group`` (made once per plan: it only holds names)."""
        stats = self._stats.get(group)
        if stats is None or stats.index is not index or stats.params is not index.params:
            stats = self._stats[group] = _UpdateStats(index, group.positions)
        return stats

    @property
    def pending(self) -> bool:
        """Whether a snapshot waits for its ``after()``."""
        return self._snapshot is not None

    def collect(self, step: int) -> dict[str, Any]:
        """The last measured update, if any."""
        out, self._result = self._result, {}
        return out

    def detach(self) -> None:
        """Drop the snapshot."""
        self._snapshot = None
        self._result = {}
        self._all_norms = None
        self._view_cache = None
        self.index = None


class _UpdateStats(Deferred):
    """Writes ``param_norm``, ``update_norm`` and ``update_ratio`` per layer when read."""

    def __init__(self, index: LayerIndex, positions: tuple[int, ...]) -> None:
        self.index, self.params = index, index.params  # what the names were read from
        layers = [index.param_layer[i] for i in positions]
        present = sorted(set(layers))
        rank = {k: j for j, k in enumerate(present)}
        self.names = [index.names[k] for k in present]
        self.seg = [rank[k] for k in layers]

    def fill(self, row: dict[str, Any]) -> None:
        """Sum the per-parameter squares into layers (float64, as on the device before)."""
        upd, par = row.pop("_update_norms"), row.pop("_update_params")
        n = len(self.names)
        upd_sq, par_sq = [0.0] * n, [0.0] * n
        for k, u, w in zip(self.seg, upd, par, strict=True):
            upd_sq[k] += u * u
            par_sq[k] += w * w
        upd_l = [math.sqrt(v) for v in upd_sq]
        par_l = [math.sqrt(v) for v in par_sq]
        row["param_norm"] = dict(zip(self.names, par_l, strict=True))
        row["update_norm"] = dict(zip(self.names, upd_l, strict=True))
        row["update_ratio"] = {
            name: u / max(w, 1e-30) for name, u, w in zip(self.names, upd_l, par_l, strict=True)
        }


class _ParamNorms(Deferred):
    """Writes ``param_norm`` of every layer (the first measurement) when read."""

    def __init__(self, index: LayerIndex, positions: tuple[int, ...]) -> None:
        self.stats = _UpdateStats(index, positions)

    def fill(self, row: dict[str, Any]) -> None:
        """Layer norms from the per-parameter ones; the measured group's entries are kept."""
        norms = row.pop("_param_norms_all")
        n = len(self.stats.names)
        squares = [0.0] * n
        for k, w in zip(self.stats.seg, norms, strict=True):
            squares[k] += w * w
        every = {name: math.sqrt(v) for name, v in zip(self.stats.names, squares, strict=True)}
        row["param_norm"] = {**every, **row.get("param_norm", {})}


#: Record keys written by this probe, dropped on read when ``_updates_keep`` is false.
UPDATE_KEYS = ("param_norm", "update_norm", "update_ratio")
