"""A lower bound on every layer's update ratio at a step whose learning rate jumped.

The update probe measures one group of layers per sampled step (a bounded copy). A
learning rate that rises several-fold from one step to the next (a scheduler's restart,
a spike) can blow the weights up in one or two steps, in layers that group does not
hold. On such a step the parameter norms are read before and after it (two norm passes,
no copy): ``| ||w_after|| - ||w_before|| | / ||w_before||`` is at most ``||dw|| / ||w||``,
so a bound above the spike threshold is a spike.
"""

from __future__ import annotations

from typing import Any

import torch

from gradmedic.layers import LayerIndex
from gradmedic.record import NamedVector
from gradmedic.sharding import any_dtensor
from gradmedic.tensorlists import foreach_norms, segment_sqrt_sum_sq, stack_on

#: A learning rate at least this many times the last recorded step's is a jump.
JUMP = 2.0


class LrJumpBound:
    """Per-layer update-ratio lower bounds on the steps whose learning rate jumped."""

    def __init__(self) -> None:
        self._last: list[float] | None = None
        self._before: torch.Tensor | None = None

    def before(self, optimizer: torch.optim.Optimizer, index: LayerIndex) -> None:
        """Read the parameter norms if this step's learning rate jumped (a host compare)."""
        self._before = None
        lrs = [group["lr"] for group in optimizer.param_groups]
        if any(isinstance(v, torch.Tensor) for v in lrs):  # a capturable lr: no host read
            self._last = None
            return
        now = [float(v) for v in lrs]
        last, self._last = self._last, now
        if last is None or len(last) != len(now):
            return
        if any(b > 0 and a >= JUMP * b for a, b in zip(now, last, strict=True)):
            params = list(index.params)
            if params and not any_dtensor(params):  # sharded norms would need a collective
                self._before = _layer_norms(index)

    def after(self, index: LayerIndex) -> dict[str, Any]:
        """``{"update_ratio_bound": per layer}`` after a jumped step's update, else nothing."""
        before, self._before = self._before, None
        if before is None:
            return {}
        after = _layer_norms(index)
        bound = (after - before).abs() / before.clamp_min(torch.finfo(before.dtype).tiny)
        return {"update_ratio_bound": NamedVector(index.names, bound)}


def _layer_norms(index: LayerIndex) -> torch.Tensor:
    params = [p.detach() for p in index.params]
    device = params[0].device
    norms = stack_on(foreach_norms(params, upcast=True), device)
    segments = torch.tensor(index.param_layer, device=device)
    return segment_sqrt_sum_sq(norms, segments, len(index.names))
