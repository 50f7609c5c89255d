"""Attach monitors to whatever a script trains, without editing it (``gradmedic run``).

Three global hooks find the models and optimizers, and are removed at the end:

* ``torch.optim.Optimizer.__init__`` is wrapped (class level, restored on exit)
  to know every optimizer the script builds;
* a global module forward pre-hook sees the first forward, with gradients
  enabled, of every module that owns parameters requiring gradients and is
  not inside a model already watched: the outermost such module is a model.
  If an optimizer holds all of its parameters, it is watched with that
  optimizer (records at ``optimizer.step()``, after the script's clipping);
  otherwise it is watched as a **manual-update loop**;
* ``nn.Module.zero_grad`` is wrapped (class level) so manual loops are
  recorded before their gradients are cleared;
* ``torch.Tensor.backward`` is wrapped (class level) to keep the loss: the
  scalar ``.backward()`` was called on goes to the record of the step (when a
  single model is watched; with several, which loss is whose is unknown).

A manual step is *a backward pass followed by a parameter change*: after each
backward pass of the model (an autograd callback) the parameter norms are
taken (one fused ``torch._foreach_norm``); at the next ``zero_grad``, the next
forward, or the end of the script, they are taken again, and a change means
the script updated the parameters: the step is recorded then (after its
clipping, with the gradients it stepped on). ``p.data.add_`` does not bump a
tensor's version counter, so versions cannot tell; norms can (an update that
leaves every norm bit-identical is not one). A backward with no parameter
change (gradient accumulation, a probe) adds to the next step.

Example:
    >>> import torch
    >>> with AutoAttach(every=1, updates=False) as session:
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    ...     for _ in range(3):
    ...         model.zero_grad()
    ...         model(torch.randn(8, 4)).pow(2).mean().backward()
    ...         with torch.no_grad():
    ...             for p in model.parameters():
    ...                 p -= 0.1 * p.grad
    >>> [(w.name, w.mode, len(w.monitor.history)) for w in session.watched]
    [('Sequential', 'manual', 3)]
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmedic.hooks import compiling
from gradmedic.monitor import Monitor, find_monitor
from gradmedic.passes import PassWatch
from gradmedic.private import in_private_work

#: The start of torch's warning at a compiled module's call while a global module hook exists.
_COMPILE_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"


@dataclass
class Watched:
    """One model the session watches.

    Attributes:
        name: The model's class name (``-k`` appended when two share one).
        model: The module.
        monitor: Its monitor.
        mode: ``"optimizer"`` (records at ``optimizer.step()``) or ``"manual"``.
        sink: The JSONL file of its records, if any.
    """

    name: str
    model: nn.Module
    monitor: Monitor
    mode: str
    sink: Path | None = None
    off: bool = False
    warned_cleared: bool = False
    _params: list[torch.Tensor] = field(default_factory=list, repr=False)
    _before: torch.Tensor | None = field(default=None, repr=False)
    _passes: PassWatch | None = field(default=None, repr=False)


class AutoAttach:
    """While active, watch every model the running code trains (see the module docstring).

    Args:
        sink: JSONL path of the first model's records; later models get
            ``<stem>-<k><suffix>``. None: no file.
        on_record: Called with ``(watched, row)`` after each recorded step
            (e.g. a TensorBoard writer); its failures only warn.
        **options: Options of :class:`gradmedic.Monitor` (``every``, ...).
    """

    def __init__(
        self,
        sink: str | os.PathLike[str] | None = None,
        on_record: Callable[[Watched, dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> None:
        self.sink = Path(sink) if sink is not None else None
        self.on_record = on_record
        self.options = options
        self.watched: list[Watched] = []
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        # module -> its Watched entry, or None once looked at and not a model of its own
        self._seen: weakref.WeakKeyDictionary[nn.Module, Watched | None] = (
            weakref.WeakKeyDictionary()
        )
        self._watched_params: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._filter: Any = None  # the warnings filter start() added
        self._restore: list[Callable[[], None]] = []
        self.active = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AutoAttach:
        """Install the global hooks."""
        if self.active:
            return self
        self.active = True
        self._patch(torch.optim.Optimizer, "__init__", self._wrap_optimizer_init)
        self._patch(nn.Module, "zero_grad", self._wrap_zero_grad)
        self._patch(torch.Tensor, "backward", self._wrap_backward)
        self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._forward))
        # torch warns at every compiled module's call while a global hook exists; this one
        # returns at once for the compiled module's inner call (it is watched as one model)
        warnings.filterwarnings("ignore", message=_COMPILE_HOOK_WARNING, category=UserWarning)
        self._filter = warnings.filters[0]
        return self

    def stop(self) -> None:
        """Record pending manual steps, remove every hook; monitors are closed. Safe twice."""
        if not self.active:
            return
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._filter in warnings.filters:
            warnings.filters.remove(self._filter)  # type: ignore[attr-defined]
            warnings._filters_mutated()  # type: ignore[attr-defined]
        for restore in reversed(self._restore):
            restore()
        self._restore = []
        for w in self.watched:
            if w.mode == "manual" and not w.off:
                self._guard(w, functools.partial(self._maybe_step, w))
            if w._passes is not None:
                w._passes.remove()
            w.monitor.close()

    def __enter__(self) -> AutoAttach:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ global hooks
    def _patch(self, owner: type, name: str, wrap: Callable[[Any], Any]) -> None:
        original = owner.__dict__[name]
        setattr(owner, name, functools.wraps(original)(wrap(original)))
        self._restore.append(lambda: setattr(owner, name, original))

    def _wrap_optimizer_init(self, original: Callable[..., None]) -> Callable[..., None]:
        session = self

        def __init__(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
            original(opt, *args, **kwargs)
            if session.active and not in_private_work():
                session._optimizers.add(opt)
                session._upgrade(opt)

        return __init__

    def _wrap_zero_grad(self, original: Callable[..., None]) -> Callable[..., None]:
        session = self

        def zero_grad(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            if session.active and not in_private_work():
                session._manual_trigger(module)
            original(module, *args, **kwargs)

        return zero_grad

    def _wrap_backward(self, original: Callable[..., None]) -> Callable[..., None]:
        session = self

        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            original(tensor, *args, **kwargs)
            if session.active and not in_private_work():
                session._note_loss(tensor)

        return backward

    def _note_loss(self, tensor: torch.Tensor) -> None:
        """The tensor ``.backward()`` was called on is the loss, when one model is watched."""
        live = [w for w in self.watched if not w.off and not w.monitor.closed]
        if len(live) == 1 and tensor.numel() == 1 and tensor.is_floating_point():
            live[0].monitor.note_loss(tensor)

    def _manual_trigger(self, module: nn.Module) -> None:
        w = self._seen.get(module)
        if w is not None and w.mode == "manual" and not w.off:
            self._guard(w, lambda: self._maybe_step(w))

    def _forward(self, module: nn.Module, inputs: Any) -> None:
        if compiling():
            return  # inside a torch.compile graph: the compiled module's eager call was seen
        if in_private_work():
            return  # gradmedic's own copies (the preflight's trial steps)
        if module in self._seen:
            self._manual_trigger(module)
            return
        if not torch.is_grad_enabled():
            return
        try:
            self._consider(module)
        except Exception as exc:  # finding models must never break the script
            self._seen[module] = None
            warnings.warn(f"gradmedic: could not watch {type(module).__name__}: {exc!r}",
                          RuntimeWarning, stacklevel=2)  # fmt: skip

    def _consider(self, module: nn.Module) -> None:
        self._seen[module] = None
        params: list[torch.Tensor] = [p for p in module.parameters() if p.requires_grad]
        if not params or any(id(p) in self._watched_params for p in params):
            return  # no trainable parameters, or inside a model already watched
        if find_monitor(params[:1]) is not None:
            return  # the script watches it itself (gradmedic.watch, a gradmedic callback)
        ids = {id(p) for p in params}
        owner = None
        for opt in list(self._optimizers):
            opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
            if opt_ids and opt_ids <= ids:
                owner = opt
                break
            if opt_ids & ids:
                return  # a part of what an optimizer trains: its whole model comes later
        self._watch(module, params, owner)

    # ------------------------------------------------------------------ watching
    def _watch(
        self, module: nn.Module, params: list[torch.Tensor], opt: torch.optim.Optimizer | None
    ) -> None:
        name = type(module).__name__
        taken = sum(1 for w in self.watched if w.name.split("-")[0] == name)
        if taken:
            name = f"{name}-{taken}"
        sink = self._sink_for(len(self.watched))
        monitor = Monitor(module, opt, sink=sink, **self.options)
        w = Watched(name, module, monitor, "optimizer" if opt is not None else "manual", sink)
        w._params = params
        self._seen[module] = w
        self._watched_params.update(id(p) for p in params)
        if opt is not None:
            self._handles.append(opt.register_step_post_hook(lambda *_: self._recorded(w)))
        else:
            w._passes = PassWatch([module], lambda: None, lambda: self._backward_ended(w))
        self.watched.append(w)

    def _upgrade(self, opt: torch.optim.Optimizer) -> None:
        """An optimizer built after its model's first forward: watch the model with it."""
        opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
        for w in list(self.watched):
            if w.mode != "manual" or w.monitor.history.total or not opt_ids:
                continue
            if opt_ids <= {id(p) for p in w._params}:
                self.watched.remove(w)
                if w._passes is not None:
                    w._passes.remove()
                w.monitor.close()
                if w.sink is not None:
                    w.sink.unlink(missing_ok=True)  # a header without records
                self._watched_params.difference_update(id(p) for p in w._params)
                self._watch(w.model, w._params, opt)

    def _sink_for(self, k: int) -> Path | None:
        if self.sink is None:
            return None
        if k == 0:
            return self.sink
        return self.sink.with_name(f"{self.sink.stem}-{k}{self.sink.suffix}")

    def _backward_ended(self, w: Watched) -> None:
        if w._before is None:
            self._guard(w, lambda: setattr(w, "_before", _norms(w._params)))

    def _maybe_step(self, w: Watched) -> None:
        """A manual loop: record if a backward pass was followed by a parameter change."""
        if w._before is None or w.off or w.monitor.closed or w.monitor.disabled:
            return
        grads = [p.grad for p in w._params if p.grad is not None]
        if torch.equal(w._before, _norms(w._params)):
            if not grads:
                w._before = None  # cleared without an update: the iteration was dropped
            return  # no update yet (accumulation): wait for the next trigger
        w._before = None
        if not grads or not bool(torch.stack(torch._foreach_norm(grads)).any()):
            self._cleared_by_hand(w)  # zero gradients are no evidence: record nothing
            return
        w.monitor.step()
        self._recorded(w)

    def _cleared_by_hand(self, w: Watched) -> None:
        if not w.warned_cleared:
            w.warned_cleared = True
            warnings.warn(
                f"gradmedic: {w.name} was updated, but its gradients were cleared by hand "
                "(p.grad.zero_() or p.grad = None) before gradmedic could read them, so "
                "that step is not recorded; clear them with model.zero_grad() at the start "
                "of the next iteration, or use gradmedic.watch and call monitor.step()",
                RuntimeWarning,
                stacklevel=4,
            )

    def _recorded(self, w: Watched) -> None:
        if self.on_record is None or w.monitor.closed:
            return
        row = w.monitor.history.last()
        if row is not None and row["step"] == w.monitor.steps - 1:
            try:
                self.on_record(w, row)
            except Exception as exc:
                self.on_record = None
                warnings.warn(f"gradmedic: a record consumer failed ({exc!r}) and is off",
                              RuntimeWarning, stacklevel=2)  # fmt: skip

    def _guard(self, w: Watched, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # monitoring must never crash the script
            w._before = None
            w.off = True
            warnings.warn(f"gradmedic: watching {w.name} failed ({exc!r}); its records so far "
                          "are kept", RuntimeWarning, stacklevel=2)  # fmt: skip


def _norms(params: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(torch._foreach_norm([p.detach() for p in params]))
