"""Where a training iteration is: the start of a forward pass, the end of a backward pass.

The optimizer's step hooks tell the monitor when an update happens. Two more
moments matter in real training, and this module reports them:

* **the end of each backward pass** (an autograd engine callback queued from
  a tensor hook on the model's output): the gradients exist, before any
  clipping or loss unscaling touches them, so pre-clip norms can be read;
* **the start of each forward pass of the model**: if a backward pass ended
  since the last update and its gradients were then changed or cleared
  without an optimizer step (``GradScaler`` found inf and skipped the step,
  or the loop discarded the batch), that iteration was abandoned, and what
  the probes gathered for it must not leak into the next record.

Both hooks do nothing while Dynamo traces the model (see :mod:`gradmedic.hooks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradmedic.hooks import ModuleHooks
from gradmedic.probes.deltas import first_tensor


class PassWatch:
    """Calls ``on_forward()`` when ``model`` starts a forward, ``on_backward_end()`` after backward.

    ``modules`` are the model itself and a few of its layers: frameworks such as
    Lightning never call the model's own ``forward`` (``training_step`` calls its
    submodules), so the input-side and output-side layers stand in. The backward
    callback fires once per backward pass that reaches the output (first tensor
    that requires grad) of any of them. ``on_output(output)`` sees each output of
    the ``roots`` (the model, or its compiled wrapper).

    Inside a forward of a root, the layers report nothing themselves: the root
    reports the forward's start, and when it returns, its output and the first
    layer output inside it that requires grad get the backward hook (two tensor
    hooks per iteration, not one per watched module).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        on_forward: Callable[[], None],
        on_backward_end: Callable[[], None],
        roots: Sequence[nn.Module] = (),
        on_output: Callable[[Any], None] | None = None,
    ) -> None:
        self._on_forward = on_forward
        self._on_backward_end = on_backward_end
        self._on_output = on_output
        self._roots = {id(m) for m in roots}
        self._queued = False
        #: id of the root whose forward is running (its layers' hooks then defer to it).
        self._root: int | None = None
        self._inside: list[torch.Tensor] = []
        self._hooks = ModuleHooks()
        for module in {id(m): m for m in modules}.values():
            self._hooks.forward_pre(module, self._forward_started)
            # A root's forward that raises (an out-of-memory retry) still closes its pass.
            always = id(module) in self._roots
            self._hooks.forward(module, self._forward_done, always_call=always)

    def remove(self) -> None:
        """Remove the hooks."""
        self._hooks.remove()

    def _forward_started(self, module: nn.Module, inputs: Any) -> None:
        if id(module) in self._roots:
            if self._root is None:  # the outermost root: the layers inside need no hook
                self._root, self._inside = id(module), []
        elif self._root is not None:
            return  # inside a forward of the model: its root already reported it
        if torch.is_grad_enabled():
            self._on_forward()

    def _forward_done(self, module: nn.Module, inputs: Any, output: Any) -> None:
        ident = id(module)
        if ident in self._roots and self._on_output is not None:
            self._on_output(output)
        if self._root is not None and ident != self._root:
            # Inside the model's forward: the hooks go on when the model returns.
            out = first_tensor(output)
            if out is not None and out.requires_grad and not self._inside:
                self._inside.append(out)
            return
        hooked = [first_tensor(output)]
        if ident == self._root:
            # The model's output, and the first layer output inside it that carries a
            # gradient: a loss that reads some other part of the output still passes there.
            hooked += self._inside
            self._root, self._inside = None, []
        if not torch.is_grad_enabled():
            return
        for out in hooked:
            if out is not None and out.requires_grad:
                out.register_hook(self._backward_reached)

    def _backward_reached(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_end)

    def _queue_end(self) -> None:
        """Queue the end of backward behind every callback queued during the pass.

        Ours is queued first (at the output's gradient); DDP queues its all-reduce's
        finalization later, and it may write the gradients in place (bucket views):
        queued again from here, the end runs after it.
        """
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        except RuntimeError:  # an engine that takes no callback from a callback: end now
            self._backward_ended()

    def _backward_ended(self) -> None:
        self._queued = False
        self._on_backward_end()
