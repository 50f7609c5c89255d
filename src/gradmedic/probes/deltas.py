"""The backpropagated signal: ||dL/d(layer output)|| per layer, plus max |output|.

Weight gradients alone hide a common explosion: when forward activations grow
as fast as the deltas (ReLU with N(0,1) weights), per-layer weight-gradient
norms stay balanced while the delta grows by orders of magnitude toward the
input. This probe measures the delta directly.

Mechanism: a forward hook on each layer registers a tensor hook on the
layer's output (only on recorded steps, only when the output requires
grad). Tensor hooks are cheaper than ``register_full_backward_hook``, which
wraps every input and output in an extra autograd node. Hooks return None:
they read the gradient, never replace it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.record import NamedVector


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a module output (tensor, tuple/list, or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class DeltaProbe(Probe):
    """Norm of dL/d(output) and max |output| of each layer on recorded steps.

    Over several backward passes in one step (gradient accumulation) the
    squared norms add up, which is the squared norm of the delta of the whole
    accumulated batch.
    """

    name = "deltas"

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._recording = True
        self._sq: dict[str, list[torch.Tensor]] = {}
        self._out_max: dict[str, torch.Tensor] = {}
        self._backward_order: list[str] = []

    def attach(self, index: LayerIndex) -> None:
        """Register a forward hook on every layer."""
        for layer in index:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer.name)))

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._recording or not torch.is_grad_enabled():
                return
            try:
                out = first_tensor(output)
                if out is None or not out.requires_grad or out.numel() == 0:
                    return
                lo, hi = torch.aminmax(out.detach())  # faster than an inf-norm on CPU
                m = torch.maximum(lo.neg(), hi)
                prev = self._out_max.get(name)
                self._out_max[name] = m if prev is None else torch.maximum(prev, m)
                out.register_hook(self._tensor_hook(name))
            except Exception as exc:  # monitoring must never break training
                if self.on_error is not None:
                    self.on_error(self, exc)

        return hook

    def _tensor_hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            try:
                g = grad.detach()
                dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
                n = torch.linalg.vector_norm(g, dtype=dtype)
                bucket = self._sq.get(name)
                if bucket is None:
                    self._sq[name] = [n * n]
                    self._backward_order.append(name)
                else:
                    bucket.append(n * n)
            except Exception as exc:
                if self.on_error is not None:
                    self.on_error(self, exc)

        return hook

    def set_recording(self, recording: bool) -> None:
        """Only recorded steps pay for the hooks."""
        self._recording = recording

    def collect(self, step: int) -> dict[str, Any]:
        """Delta norms (input-to-output order is applied by the monitor) and output maxima."""
        out: dict[str, Any] = {}
        if self._sq:
            names = tuple(self._sq)
            sq = [torch.stack(v).sum() if len(v) > 1 else v[0] for v in self._sq.values()]
            device = sq[0].device
            vals = torch.stack([s.to(device=device, dtype=torch.float64) for s in sq]).sqrt()
            out["delta_norm"] = NamedVector(names, vals)
            out["_backward_order"] = list(self._backward_order)
        if self._out_max:
            names = tuple(self._out_max)
            first = next(iter(self._out_max.values()))
            vals = torch.stack(
                [v.to(device=first.device, dtype=torch.float64) for v in self._out_max.values()]
            )
            out["output_max"] = NamedVector(names, vals)
        return out

    def reset(self) -> None:
        """Forget this step's deltas."""
        self._sq = {}
        self._out_max = {}
        self._backward_order = []

    def detach(self) -> None:
        """Remove the forward hooks (tensor hooks die with their graphs)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()
