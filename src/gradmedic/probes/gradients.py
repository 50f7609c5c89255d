"""Per-parameter and per-layer gradient norms in one fused pass over all gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.record import NamedVector
from gradmedic.tensorlists import (
    abs_maxes,
    foreach_norms,
    segment_max,
    segment_sqrt_sum_sq,
    stack_on,
)


class GradientProbe(Probe):
    """L2 norm and max |g| of each parameter's and each layer's gradient.

    Reads ``p.grad`` of every parameter at record time: no hooks, one
    ``torch._foreach_norm`` per (device, dtype) for the L2 norms and one for
    the max norms. Layers whose parameters have no gradient this step
    (frozen, unused) are left out of the record.

    A gradmedic clipping call made before the record hands its pre-clip norms
    over (:meth:`offer_norms`), so clipping plus monitoring reads the
    gradients once.

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
        self._offered: tuple[list[int], list[torch.Tensor], torch.Tensor] | None = None
        self._snapshot: _Snapshot | None = None
        #: The global norm of the last collected step, on the host.
        self.last_total: float | None = None
        #: Set by the monitor before :meth:`collect`: the GradScaler's scale, if any.
        self.loss_scale: torch.Tensor | None = None

    def attach(self, index: LayerIndex) -> None:
        """Remember the layer index (no hooks needed)."""
        self.index = index

    def offer_norms(
        self, grads: list[torch.Tensor], norms: list[torch.Tensor], scale: torch.Tensor
    ) -> None:
        """Accept L2 norms already computed for ``grads``, which were then scaled by ``scale``."""
        self._offered = ([id(g) for g in grads], norms, scale)

    def snapshot(self) -> None:
        """Read the per-parameter L2 norms now (the end of a backward pass)."""
        picked = self._picked()
        if not picked:
            self._snapshot = None
            return
        grads = [g for _, g in picked]
        self._snapshot = _Snapshot(
            tuple(i for i, _ in picked),
            tuple((id(g), g._version) for g in (grads[0], grads[-1])),
            foreach_norms(grads, upcast=True),
        )

    def changed_since_snapshot(self) -> bool:
        """Whether a gradient was replaced, cleared or modified in place since the snapshot."""
        snap = self._snapshot
        if snap is None or self.index is None:
            return False
        params = self.index.params
        # Clearing, clipping and unscaling touch every gradient: the first and last tell.
        for k, (ident, version) in zip((0, -1), snap.sentinels, strict=True):
            g = params[snap.positions[k]].grad
            if g is None or id(g) != ident or g._version != version:
                return True
        return False

    def reset(self) -> None:
        """Drop norms offered or snapshotted for the finished step."""
        self._offered = None
        self._snapshot = None
        self.loss_scale = None

    def _picked(self) -> list[tuple[int, torch.Tensor]]:
        if self.index is None:
            return []
        return [(i, p.grad) for i, p in enumerate(self.index.params) if p.grad is not None]

    def collect(self, step: int) -> dict[str, Any]:
        """Gradient statistics of the current ``.grad`` tensors."""
        index = self.index
        picked = self._picked()
        if index is None or not picked:
            return {}
        pos = [i for i, _ in picked]
        grads = [g for _, g in picked]
        device = grads[0].device
        snap = self._snapshot
        if snap is not None and snap.positions != tuple(pos):
            snap = None  # gradients appeared or vanished since the backward pass
        pre: torch.Tensor | None = None
        # GradScaler unscales in place without bumping version counters: with a loss
        # scale, the gradients are always read again.
        if snap is not None and self.loss_scale is None and not self.changed_since_snapshot():
            l2 = stack_on(snap.norms, device)
        else:
            l2 = stack_on(self._reuse_or_compute(grads), device)
            if snap is not None:
                pre = stack_on(snap.norms, device)
                if self.loss_scale is not None:
                    pre = pre / self.loss_scale.to(device=device, dtype=pre.dtype)
        # One host read per recorded step (the global norm and the smallest norm):
        # it tells whether a float32 sum of squares overflowed or underflowed, and
        # the monitor uses the norm to measure the update of a step whose norm jumped.
        total = l2.square().sum().sqrt()
        self.last_total, smallest = torch.stack([total, l2.min()]).tolist()
        if not math.isfinite(self.last_total) or smallest == 0:
            # Rare: entries near 1e28 overflow the squares, near 1e-26 underflow them.
            # float64 holds the square of every float32; read the gradients again in it.
            l2 = stack_on(foreach_norms(grads, wide=True), device)
            total = l2.square().sum().sqrt()
            self.last_total = float(total)
        inf = abs_maxes(grads, device)
        names, seg = index.segments(tuple(pos), device)
        layer_l2 = segment_sqrt_sum_sq(l2, seg, len(names))
        layer_max = segment_max(inf, seg, len(names))
        out: dict[str, Any] = {
            "grad_norm": NamedVector(names, layer_l2),
            "grad_max": NamedVector(names, layer_max),
            "param_grad_norm": NamedVector(tuple(index.param_names[i] for i in pos), l2),
            "global_grad_norm": total,
        }
        # Counting bad elements needs another pass, which only a non-finite step pays.
        finite = math.isfinite(self.last_total)
        counts = torch.zeros(len(names), dtype=torch.long, device=device)
        if not finite:
            bad = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).to(device)
            counts.index_add_(0, seg, bad)
        out["grad_nonfinite"] = NamedVector(names, counts)
        out["_grads_finite"] = finite
        if pre is not None:
            pre_layer = segment_sqrt_sum_sq(pre, seg, len(names))
            out["pre_clip_grad_norm"] = NamedVector(names, pre_layer)
            out["pre_clip_global_grad_norm"] = pre.square().sum().sqrt()
        return out

    def _reuse_or_compute(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        offered = self._offered
        if offered is not None:
            ids, norms, scale = offered
            lookup = dict(zip(ids, norms, strict=True))
            if all(id(g) in lookup for g in grads):
                return [lookup[id(g)] * scale for g in grads]
        return foreach_norms(grads, upcast=True)

    def detach(self) -> None:
        """Nothing to remove."""
        self.index = None
        self.reset()


@dataclass(frozen=True)
class _Snapshot:
    """Per-parameter norms read at the end of a backward pass, and what they were read from."""

    positions: tuple[int, ...]
    #: ``(id, version counter)`` of the first and the last gradient.
    sentinels: tuple[tuple[int, int], ...]
    norms: list[torch.Tensor]
