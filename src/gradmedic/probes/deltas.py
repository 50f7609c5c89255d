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

from gradmedic.hooks import ModuleHooks
from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.record import NamedVector
from gradmedic.tensorlists import segment_max, stack_on


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
        self._hooks = ModuleHooks()
        self._recording = True
        # Per layer, in the order hooks fired: every delta norm and every (min, max) of
        # the output this step. Reduced to one vector each at collect time, so the hooks
        # themselves launch one reduction and no arithmetic.
        self._norms: dict[str, list[torch.Tensor]] = {}
        self._extrema: dict[str, list[torch.Tensor]] = {}
        self._tensor_hooks: dict[str, Any] = {}

    def attach(self, index: LayerIndex) -> None:
        """Register a forward hook on every layer."""
        for layer in index:
            self._tensor_hooks[layer.name] = self._tensor_hook(layer.name)
            self._hooks.forward(layer.module, self._forward_hook(layer.name))

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._recording or not torch.is_grad_enabled():
                return
            try:
                out = first_tensor(output)
                if out is None or not out.requires_grad or out.numel() == 0:
                    return
                # aminmax reads the output once; an inf-norm is several times slower on CPU
                self._extrema.setdefault(name, []).extend(torch.aminmax(out.detach()))
                out.register_hook(self._tensor_hooks[name])
            except Exception as exc:  # monitoring must never break training
                if self.on_error is not None:
                    self.on_error(self, exc)

        return hook

    def _tensor_hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            try:
                # float32 sums of squares (a float64 reduction costs 6x on CPU). An
                # extreme but finite delta (entries near 1e28) can overflow to inf; the
                # monitor then names no non-finite origin unless the gradients are too.
                g = grad.detach()
                dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
                self._norms.setdefault(name, []).append(torch.linalg.vector_norm(g, dtype=dtype))
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
        if self._norms:
            names = tuple(self._norms)  # insertion order = the order deltas arrived
            flat = [n for norms in self._norms.values() for n in norms]
            device = flat[0].device
            squares = stack_on(flat, device).square()
            segments = torch.tensor(
                [k for k, norms in enumerate(self._norms.values()) for _ in norms], device=device
            )
            # Over several backward passes (accumulation) the squares add up: the norm of
            # the delta of the whole accumulated batch.
            total = torch.zeros(len(names), dtype=squares.dtype, device=device)
            out["delta_norm"] = NamedVector(names, total.index_add_(0, segments, squares).sqrt())
            out["_backward_order"] = list(names)
        if self._extrema:
            names = tuple(self._extrema)
            flat = [t for ext in self._extrema.values() for t in ext]
            device = flat[0].device
            # One stack and one scatter for every layer (NaN propagates into the max).
            segments = torch.tensor(
                [k for k, ext in enumerate(self._extrema.values()) for _ in ext], device=device
            )
            values = stack_on(flat, device).abs()
            out["output_max"] = NamedVector(names, segment_max(values, segments, len(names)))
        return out

    def reset(self) -> None:
        """Forget this step's deltas."""
        self._norms = {}
        self._extrema = {}

    def detach(self) -> None:
        """Remove the forward hooks (tensor hooks die with their graphs)."""
        self._hooks.remove()
        self.reset()
