"""Curvature along the update, sampled: the runtime view of the preflight's sharpness.

Between two consecutive recorded steps the parameters move by ``dw`` and the
gradient changes by ``dg``; on a quadratic ``dg = H dw``, so the secant

    ``curvature = <dg, dw> / <dw, dw>``

is the Rayleigh quotient of the Hessian along the step, a lower bound of the
top eigenvalue that grows with it (progressive sharpening) and that the step
is stable against while ``lr * curvature < 2`` (SGD; see
:func:`gradmedic.curvature.stability_limit`). Minibatch noise enters ``dg``:
read it as a trend over records, not one value.

Memory is bounded: the probe keeps a fixed strided sample of at most
``max_elements`` parameter elements (values and gradients) from one recorded
step, every ``every`` steps; the next recorded step, if it is the following
one, gives the secant. It reads and copies only; the run is unchanged.

Example:
    >>> import torch, gradmedic
    >>> w = torch.nn.Linear(4, 1, bias=False)
    >>> opt = torch.optim.SGD(w.parameters(), lr=0.1)
    >>> with gradmedic.watch(w, opt, every=1, probes=[CurvatureProbe(every=1)]) as mon:
    ...     for _ in range(3):
    ...         opt.zero_grad()
    ...         (3.0 * w.weight.pow(2).sum()).backward()  # Hessian 6 I
    ...         opt.step()
    >>> round(float(mon.history.rows()[-1]["curvature"]), 3)
    6.0
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gradmedic.probes.base import Probe

if TYPE_CHECKING:
    from gradmedic.layers import LayerIndex


class CurvatureProbe(Probe):
    """The secant curvature ``<dg, dw> / |dw|^2`` between consecutive recorded steps.

    Args:
        every: Snapshot one step in this many (the secant needs the next step recorded).
        max_elements: Most parameter elements sampled (the memory bound: two
            float32 copies of this many elements).
    """

    name = "curvature"

    def __init__(self, every: int = 10, max_elements: int = 1 << 16) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        self.every = every
        self.max_elements = max_elements
        self._params: list[torch.nn.Parameter] = []
        self._strides: list[int] = []
        self._previous: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def attach(self, index: LayerIndex) -> None:
        """Fix the sample: every ``stride``-th element of each trainable parameter."""
        self._params = [p for p in index.params if p.requires_grad]
        total = sum(p.numel() for p in self._params)
        stride = max(1, math.ceil(total / self.max_elements))
        self._strides = [stride] * len(self._params)

    def _sample(self, grads: bool) -> torch.Tensor | None:
        parts = []
        for p, s in zip(self._params, self._strides, strict=True):
            t = p.grad if grads else p
            if t is None:
                return None
            parts.append(t.detach().reshape(-1)[::s].float())
        return torch.cat(parts) if parts else None

    def collect(self, step: int) -> dict[str, Any]:
        """``{"curvature": tensor}`` when the previous step was snapshotted; snapshot if due."""
        out: dict[str, Any] = {}
        w, g = self._sample(grads=False), self._sample(grads=True)
        if w is None or g is None:
            self._previous = None
            return out
        if self._previous is not None and self._previous[0] == step - 1:
            _, w0, g0 = self._previous
            dw = w - w0
            out["curvature"] = (g - g0).dot(dw) / dw.dot(dw).clamp_min(1e-30)
        self._previous = (step, w.clone(), g.clone()) if step % self.every == 0 else None
        return out

    def detach(self) -> None:
        """Drop the snapshot (the probe registers no hooks)."""
        self._previous = None
