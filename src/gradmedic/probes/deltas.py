"""The backpropagated signal: ||dL/d(layer output)|| per layer, plus max |output|.

Weight gradients alone hide a common explosion: when forward activations grow
as fast as the deltas (ReLU with N(0,1) weights), per-layer weight-gradient
norms stay balanced while the delta grows by orders of magnitude toward the
input. This probe measures the delta directly.

Mechanism: a forward hook on each measured layer registers a tensor hook on
the layer's output (only on recorded steps, only when the output requires
grad). Tensor hooks are cheaper than ``register_full_backward_hook``, which
wraps every input and output in an extra autograd node. Hooks return None:
they read the gradient, never replace it.

Cost flat in depth: a model of up to :data:`~gradmedic.probes.rotation.PER_STEP`
layers has every layer measured on every recorded step; a deeper one has an
interleaved share of them (every ``k``-th layer) measured in turn, so each
record's profile spans the whole depth and every layer is measured once in ``k``
recorded steps (:mod:`gradmedic.probes.rotation`). Only the share's layers carry
hooks, and only on recorded steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from gradmedic.hooks import ModuleHooks
from gradmedic.layers import LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.probes.rotation import PER_STEP, share
from gradmedic.record import NamedVector
from gradmedic.tensorlists import extrema, foreach_norms, segment_max, stack_on

#: Output gradients up to this many elements are held until the step is collected and
#: reduced together (one ``torch._foreach_norm``, not one dispatch per layer); larger ones
#: are reduced as they arrive, so what is held stays small ...
HOLD_NUMEL = 1 << 16
#: ... and never more than this many elements in all (several backward passes a step).
HOLD_BUDGET = 1 << 21


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
    """Norm of dL/d(output) and max |output| of each measured layer on recorded steps.

    Over several backward passes in one step (gradient accumulation) the
    squared norms add up, which is the squared norm of the delta of the whole
    accumulated batch.

    Args:
        per_step: Layers measured per recorded step at most (deeper models are
            measured in interleaved shares, in turn); None: ``PER_STEP``.
    """

    name = "deltas"

    def __init__(self, per_step: int | None = None) -> None:
        per_step = PER_STEP if per_step is None else per_step
        if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
            raise ValueError(f"per_step must be a positive int, got {per_step!r}")
        self.per_step = per_step
        self._hooks = ModuleHooks()
        self._index: LayerIndex | None = None
        self._turn = 0  # recorded steps measured so far: which share is next
        self._hooked: tuple[str, ...] = ()
        # Per layer, in the order hooks fired: every delta norm and every (min, max) of
        # the output this step. Reduced to one vector each at collect time, so the hooks
        # themselves launch one reduction and no arithmetic.
        self._norms: dict[str, list[torch.Tensor | None]] = {}
        self._extrema: dict[str, list[torch.Tensor]] = {}
        # Small output gradients awaiting their norms: (layer's list, slot in it, gradient).
        self._held: list[tuple[list[torch.Tensor | None], int, torch.Tensor]] = []
        self._held_numel = 0
        self._forward_hooks: dict[str, Any] = {}
        #: Layers whose output was float16 on a recorded step (autocast), and its device
        #: type: their deltas are float16 too, and flush to 0 below 6e-8.
        self.float16: dict[str, str] = {}

    def attach(self, index: LayerIndex) -> None:
        """Remember the layers; hooks go on the measured share once a step is recorded."""
        self._index = index

    def set_recording(self, recording: bool) -> None:
        """Hook this step's share of the layers when it is recorded, none otherwise."""
        index = self._index
        names = share(index.names, self._turn, self.per_step) if recording and index else ()
        if names == self._hooked:
            return
        self._hooks.release()  # guards and wrappers stay: the next share re-hooks cheaply
        self._hooked = names
        if index is None:
            return
        for name in names:
            self._hooks.forward(index.by_name[name].module, self._forward_hook(name))

    def _forward_hook(self, name: str) -> Any:
        """The forward hook of layer ``name`` (made once: re-hooking reuses it)."""
        known = self._forward_hooks.get(name)
        if known is None:
            known = self._forward_hooks[name] = self._new_forward_hook(name)
        return known

    def _new_forward_hook(self, name: str) -> Any:
        tensor_hook = self._tensor_hook(name)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            try:
                out = first_tensor(output)
                if out is None or not out.requires_grad or out.numel() == 0:
                    return
                if out.dtype == torch.float16 and name not in self.float16:
                    self.float16[name] = out.device.type
                # (max, min): much faster than an inf-norm, and no |out| is allocated. Grad
                # mode off instead of a detach(): one dispatch less per layer.
                torch._C._set_grad_enabled(False)
                try:
                    self._extrema.setdefault(name, []).extend(extrema(out))
                finally:
                    torch._C._set_grad_enabled(True)
                out.register_hook(tensor_hook)
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
                # Backward runs without grad mode: only create_graph=True gives a gradient
                # that requires grad, and only then is a detach (one more dispatch) needed.
                g = grad.detach() if grad.requires_grad else grad
                norms = self._norms.setdefault(name, [])
                if g.numel() <= HOLD_NUMEL:
                    norms.append(None)  # the slot keeps the order the deltas arrived in
                    self._held.append((norms, len(norms) - 1, g))
                    self._held_numel += g.numel()
                    if self._held_numel > HOLD_BUDGET:
                        self._reduce_held()
                    return
                dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
                norms.append(torch.linalg.vector_norm(g, dtype=dtype))
            except Exception as exc:
                if self.on_error is not None:
                    self.on_error(self, exc)

        return hook

    def _reduce_held(self) -> None:
        """The held gradients' norms, in one fused reduction, into their slots."""
        held, self._held, self._held_numel = self._held, [], 0
        if held:
            norms = foreach_norms([g for _, _, g in held], upcast=True)
            for (slots, k, _), norm in zip(held, norms, strict=True):
                slots[k] = norm

    def collect(self, step: int) -> dict[str, Any]:
        """Delta norms (input-to-output order is applied by the monitor) and output maxima."""
        self._turn += 1
        self._reduce_held()
        out: dict[str, Any] = {}
        if self._norms:
            names = tuple(self._norms)  # insertion order = the order deltas arrived
            norms = _flat(list(self._norms.values()))
            if len(norms) != len(names):
                # Over several backward passes (accumulation) the squares add up: the norm
                # of the delta of the whole accumulated batch.
                wide = norms.double()  # squares of float32 norms may overflow float32
                norms = _segment_sum(wide.square(), self._norms).sqrt()
            out["delta_norm"] = NamedVector(names, norms)
            out["_backward_order"] = list(names)
        if self._extrema:
            names = tuple(self._extrema)
            values = _flat(list(self._extrema.values())).abs()
            out["output_max"] = NamedVector(names, _segment_amax(values, self._extrema))
        return out

    def reset(self) -> None:
        """Forget this step's deltas."""
        self._norms = {}
        self._extrema = {}
        self._held, self._held_numel = [], 0

    def detach(self) -> None:
        """Remove the forward hooks (tensor hooks die with their graphs)."""
        self._hooks.remove()
        self._hooked = ()
        self._forward_hooks = {}
        self._index = None
        self.reset()


def _flat(groups: Sequence[Sequence[torch.Tensor | None]]) -> torch.Tensor:
    """The groups' 0-d tensors (every held slot filled by now), in order, as one vector."""
    flat = cast("list[torch.Tensor]", [t for group in groups for t in group])
    return stack_on(flat, flat[0].device, dtype=None)  # their promoted dtype


def _segment_ids(groups: Mapping[str, Sequence[Any]], device: torch.device) -> torch.Tensor:
    return torch.tensor([k for k, g in enumerate(groups.values()) for _ in g], device=device)


def _segment_sum(values: torch.Tensor, groups: Mapping[str, Sequence[Any]]) -> torch.Tensor:
    """Per group, the sum of its values."""
    total = torch.zeros(len(groups), dtype=values.dtype, device=values.device)
    return total.index_add_(0, _segment_ids(groups, values.device), values)


def _segment_amax(values: torch.Tensor, groups: Mapping[str, Sequence[Any]]) -> torch.Tensor:
    """Per group, the max of its values (NaN propagates); one (min, max) pair each: one amax."""
    if len(values) == 2 * len(groups):
        return values.view(-1, 2).amax(dim=1)
    return segment_max(values, _segment_ids(groups, values.device), len(groups))
