"""Which modules ran, in the order their forwards finished, and which first output NaN/Inf.

One tracer serves ``watch()`` and ``check()``: the monitor arms it for its first
recorded step (the layer order and the activation that follows each layer come from
it), then removes its hooks, so later steps pay nothing. A module counts as the
maker of a NaN/Inf when its output is the first one, in completion order, to hold
one and it is a leaf or has parameters of its own (a container's output is its
last child's). The test is a device tensor per module, read once, when the record
is read: the step itself makes no host read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic.hooks import ModuleHooks
from gradmedic.probes.deltas import first_tensor


class NonfiniteFlags:
    """Per-module "output held NaN/Inf" flags of one step, in completion order."""

    def __init__(self, names: list[str], flags: list[torch.Tensor]) -> None:
        self.names = names
        self._flags = flags

    def first(self) -> str | None:
        """The first module whose output held NaN/Inf (one host read), or None."""
        if not self._flags:
            return None
        device = self._flags[0].device  # a model split over devices: gather on the first
        hits = torch.stack([f.to(device) for f in self._flags]).nonzero()
        return self.names[int(hits[0, 0])] if hits.numel() else None


class ForwardTrace:
    """Forward hooks on every submodule of ``model`` while armed.

    Records the completion order of forwards run with gradients enabled (each module
    once, at its first completion) and, per step, which modules' outputs held NaN/Inf
    (one flag per module, over all its calls in the step: memory stays bounded).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._hooks = ModuleHooks()
        self._order: dict[str, None] = {}
        self._flags: dict[str, torch.Tensor] = {}  # one per module (bounded), first-run order

    @property
    def armed(self) -> bool:
        """Whether the hooks are in place."""
        return len(self._hooks) > 0

    @property
    def order(self) -> list[str]:
        """Module names in the order their forwards first finished."""
        return list(self._order)

    def arm(self) -> None:
        """Hook every submodule (a no-op when armed already)."""
        if self.armed:
            return
        for name, module in self.model.named_modules():
            if name:
                self._hooks.forward(module, self._hook(name, _makes_outputs(module)))

    def disarm(self) -> None:
        """Remove the hooks (the order and the flags taken so far stay)."""
        self._hooks.remove()

    def take_flags(self) -> NonfiniteFlags:
        """This step's non-finite flags; the next step starts with none."""
        out = NonfiniteFlags(list(self._flags), list(self._flags.values()))
        self._flags = {}
        return out

    def _hook(self, name: str, makes_outputs: bool) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return  # evaluation passes are no training step
            self._order.setdefault(name, None)
            out = first_tensor(output)
            if makes_outputs and out is not None and out.is_floating_point():
                flag = ~torch.isfinite(out.detach()).all()
                seen = self._flags.get(name)  # called again (several forwards in one step)
                self._flags[name] = flag if seen is None else seen | flag

        return hook


def _makes_outputs(module: nn.Module) -> bool:
    """A leaf, or a module with parameters of its own (its forward computes, not only routes)."""
    return not any(True for _ in module.children()) or any(
        True for _ in module.parameters(recurse=False)
    )
