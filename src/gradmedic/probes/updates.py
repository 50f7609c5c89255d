"""Update size: ||delta w|| / ||w|| per layer, sampled.

With an optimizer, ``before()`` runs in its step pre-hook and ``after()`` in
its post-hook. Without one, the monitor calls ``after()`` then ``before()``
at each ``step()``, so the update measured is the change since the previous
recorded step (one optimizer step when every step is recorded).

Taking a snapshot copies the parameters, so updates are sampled
(``update_every``) to keep the cost of monitoring low.
"""

from __future__ import annotations

from typing import Any

import torch

from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.record import NamedVector
from gradmedic.tensorlists import foreach_norms, segment_sqrt_sum_sq, stack_on


class UpdateProbe(Probe):
    """Parameter norm, update norm and update-to-weight ratio per layer."""

    name = "updates"

    def __init__(self) -> None:
        self.index: LayerIndex | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._positions: tuple[int, ...] = ()
        self._result: dict[str, Any] = {}

    def attach(self, index: LayerIndex) -> None:
        """Remember the layer index."""
        self.index = index

    def before(self) -> None:
        """Copy the current parameters (one fused copy per device and dtype)."""
        if self.index is None:
            return
        params = self.index.params
        self._positions = tuple(i for i, p in enumerate(params) if p.requires_grad)
        if not self._positions:
            return
        with torch.no_grad():
            self._snapshot = list(torch._foreach_mul([params[i] for i in self._positions], 1.0))

    def after(self) -> None:
        """Measure the change since :meth:`before` and keep it for :meth:`collect`."""
        index, snap = self.index, self._snapshot
        self._snapshot = None
        if index is None or snap is None or not index.params:
            return
        with torch.no_grad():
            params = [index.params[i].detach() for i in self._positions]
            diffs = torch._foreach_sub(params, snap)
            device = params[0].device
            upd = stack_on(foreach_norms(diffs, upcast=True), device)
            old = stack_on(foreach_norms(snap, upcast=True), device)
        names, seg = index.segments(self._positions, device)
        upd_l = segment_sqrt_sum_sq(upd, seg, len(names))
        par_l = segment_sqrt_sum_sq(old, seg, len(names))
        self._result = {
            "param_norm": NamedVector(names, par_l),
            "update_norm": NamedVector(names, upd_l),
            "update_ratio": NamedVector(names, upd_l / par_l.clamp_min(1e-30)),
        }

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
        self.index = None
