"""Per-parameter and per-layer gradient norms in one fused pass over all gradients."""

from __future__ import annotations

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
    """

    name = "gradients"

    def __init__(self) -> None:
        self.index: LayerIndex | None = None
        self._offered: tuple[list[int], list[torch.Tensor], torch.Tensor] | None = None

    def attach(self, index: LayerIndex) -> None:
        """Remember the layer index (no hooks needed)."""
        self.index = index

    def offer_norms(
        self, grads: list[torch.Tensor], norms: list[torch.Tensor], scale: torch.Tensor
    ) -> None:
        """Accept L2 norms already computed for ``grads``, which were then scaled by ``scale``."""
        self._offered = ([id(g) for g in grads], norms, scale)

    def reset(self) -> None:
        """Drop norms offered for the finished step."""
        self._offered = None

    def collect(self, step: int) -> dict[str, Any]:
        """Gradient statistics of the current ``.grad`` tensors."""
        index = self.index
        if index is None:
            return {}
        picked = [(i, p.grad) for i, p in enumerate(index.params) if p.grad is not None]
        if not picked:
            return {}
        pos = [i for i, _ in picked]
        grads = [g for _, g in picked]
        device = grads[0].device
        l2 = stack_on(self._reuse_or_compute(grads), device)
        inf = abs_maxes(grads, device)
        names, seg = index.segments(tuple(pos), device)
        layer_l2 = segment_sqrt_sum_sq(l2, seg, len(names))
        layer_max = segment_max(inf, seg, len(names))
        total = l2.square().sum().sqrt()
        out: dict[str, Any] = {
            "grad_norm": NamedVector(names, layer_l2),
            "grad_max": NamedVector(names, layer_max),
            "param_grad_norm": NamedVector(tuple(index.param_names[i] for i in pos), l2),
            "global_grad_norm": total,
        }
        # One host read per recorded step: counting bad elements needs another pass,
        # which only a non-finite step pays.
        finite = bool(torch.isfinite(total))
        counts = torch.zeros(len(names), dtype=torch.long, device=device)
        if not finite:
            bad = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).to(device)
            counts.index_add_(0, seg, bad)
        out["grad_nonfinite"] = NamedVector(names, counts)
        out["_grads_finite"] = finite
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
