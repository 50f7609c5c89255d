"""Module hooks that stay out of the model's pickled state and out of compiled graphs.

Every gradmedic forward hook is registered through a :class:`ModuleHooks`.
Two things make them safe to leave on in real training:

* **Pickling.** ``torch.save(model)``, ``pickle`` and ``copy.deepcopy`` store a
  module's hook dicts with it, and gradmedic's hooks are closures that cannot
  be pickled. Each hooked module gets an instance-level ``__reduce_ex__`` that
  reduces the module exactly as its class would, minus gradmedic's hooks and
  itself: the saved or copied model carries no gradmedic hook (and a deep
  copy is not silently monitored by the original's monitor).
* **torch.compile.** A hook body that Dynamo traces must not append to Python
  lists or register tensor hooks (``fullgraph=True`` fails on such side
  effects, and guards on probe state recompile every step). Hooks registered
  here return at once while Dynamo is tracing; statistics that can only be
  taken in eager mode are then missing, and the monitor says which.

Example:
    >>> import copy, pickle, torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> hooks = ModuleHooks()
    >>> hooks.forward(layer, lambda m, i, o: None)
    >>> len(layer._forward_hooks), len(pickle.loads(pickle.dumps(layer))._forward_hooks)
    (1, 0)
    >>> len(copy.deepcopy(layer)._forward_hooks)
    0
    >>> hooks.remove()
    >>> len(layer._forward_hooks), "__reduce_ex__" in vars(layer)
    (0, False)
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_GUARD = "__reduce_ex__"
#: Hook wrappers a :class:`ModuleHooks` keeps for re-hooking (bounded: nothing grows with steps).
_WRAPPERS_KEPT = 4096


def compiling() -> bool:
    """Whether Dynamo is tracing the current code (hooks must not have side effects then)."""
    return torch.compiler.is_compiling()


class ModuleHooks:
    """A set of forward hooks on modules, removable at once, invisible to pickling.

    Probes that measure a rotating share of the layers re-hook modules every
    recorded step: :meth:`release` takes the hooks off but keeps the pickling
    guards and each hook's wrapper, so hooking the same modules again costs
    little; :meth:`remove` takes everything off.
    """

    def __init__(self) -> None:
        self._handles: list[tuple[nn.Module, RemovableHandle]] = []
        #: Modules carrying a pickling guard installed here, by id.
        self._guarded: dict[int, nn.Module] = {}
        #: ``id(hook) -> (hook, wrapper)``: a hook registered again reuses its wrapper.
        self._wrapped: dict[int, tuple[Callable[..., None], Callable[..., None]]] = {}
        #: ``(id(module), id(hook)) -> (module, hook, handle, wrapper)`` of plain forward
        #: hooks once registered: hooking the pair again puts the wrapper back under the
        #: handle's own id, one dict insert instead of a new handle (~10 us per layer).
        self._parked: dict[tuple[int, int], tuple[nn.Module, Any, RemovableHandle, Any]] = {}

    def forward(
        self,
        module: nn.Module,
        hook: Callable[..., None],
        *,
        with_kwargs: bool = False,
        always_call: bool = False,
    ) -> None:
        """Register ``hook(module, inputs, output)`` (or with kwargs) on ``module``.

        ``always_call``: also when the forward raises (then with ``output=None``).
        """
        plain = not with_kwargs and not always_call
        key = (id(module), id(hook))
        parked = self._parked.get(key) if plain else None
        if (
            parked is not None
            and parked[0] is module
            and parked[1] is hook  # the ids are still these objects'
            and parked[2].id not in module._forward_hooks  # not hooked twice under one id
        ):
            _, _, handle, wrapper = parked
            module._forward_hooks[handle.id] = wrapper
        else:
            wrapper = self._wrapper(hook)
            handle = module.register_forward_hook(
                wrapper, with_kwargs=with_kwargs, always_call=always_call
            )
            if plain:
                if len(self._parked) >= _WRAPPERS_KEPT:
                    self._parked.clear()
                self._parked[key] = (module, hook, handle, wrapper)
        self._keep(module, handle)

    def forward_pre(self, module: nn.Module, hook: Callable[..., None]) -> None:
        """Register ``hook(module, inputs)`` on ``module``."""
        self._keep(module, module.register_forward_pre_hook(self._wrapper(hook)))

    def release(self) -> None:
        """Remove every hook; keep the pickling guards (empty) and wrappers for re-hooking."""
        for module, handle in self._handles:
            handle.remove()
            guard = vars(module).get(_GUARD)
            if isinstance(guard, _PickleGuard):
                guard.ids.discard(handle.id)
        self._handles = []

    def remove(self) -> None:
        """Remove every hook and every pickling guard. Safe to call twice."""
        self.release()
        for module in self._guarded.values():
            guard = vars(module).get(_GUARD)
            if isinstance(guard, _PickleGuard) and not guard.ids:
                del vars(module)[_GUARD]
        self._guarded = {}
        self._wrapped = {}
        self._parked = {}

    def __len__(self) -> int:
        return len(self._handles)

    def _wrapper(self, hook: Callable[..., None]) -> Callable[..., None]:
        known = self._wrapped.get(id(hook))
        if known is not None and known[0] is hook:
            return known[1]
        wrapped = _eager(hook)
        if len(self._wrapped) >= _WRAPPERS_KEPT:  # callers passing a new closure each time
            self._wrapped.clear()
        self._wrapped[id(hook)] = (hook, wrapped)  # the hook is held: its id stays its own
        return wrapped

    def _keep(self, module: nn.Module, handle: RemovableHandle) -> None:
        self._handles.append((module, handle))
        guard = vars(module).get(_GUARD)
        if not isinstance(guard, _PickleGuard):
            # An instance attribute: pickle and copy look __reduce_ex__ up on the object.
            guard = vars(module)[_GUARD] = _PickleGuard(module)
        self._guarded[id(module)] = module
        guard.ids.add(handle.id)


def recomputing() -> bool:
    """Whether this forward is a non-reentrant ``torch.utils.checkpoint`` recomputation.

    During backward the checkpoint reruns the checkpointed forward, with its module hooks,
    to rebuild the tensors it did not save: no new forward to measure (it would be counted
    twice), and a hook saving a tensor there breaks the recomputation's count. A reentrant
    checkpoint's rerun is measured: its first forward ran without grad, unmeasured.
    """
    if _graph_task_id() == -1:  # not inside a backward pass: one C call, the common case
        return False
    top = _top_saved_hooks(False)
    return top is not None and "_recomputation_hook" in getattr(top[0], "__qualname__", "")


_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_top_saved_hooks: Callable[[bool], Any] = getattr(
    torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None
)


def _eager(hook: Callable[..., None]) -> Callable[..., None]:
    failed = False

    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> None:
        nonlocal failed
        if compiling() or failed or recomputing():
            return None
        try:
            hook(*args, **kwargs)
        except Exception as exc:  # a monitoring hook must never break the forward pass
            failed = True
            warnings.warn(
                f"gradmedic: hook {getattr(hook, '__qualname__', hook)!r} failed ({exc!r}) "
                "and is off for the rest of this run",
                RuntimeWarning,
                stacklevel=2,
            )
        return None

    return run


class _PickleGuard:
    """``module.__reduce_ex__``: reduce as the class would, leaving out gradmedic's hooks."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)
        self.ids: set[int] = set()

    def __call__(self, protocol: int) -> Any:
        module = self.module()
        assert module is not None  # the guard lives in the module's own __dict__
        reduced = type(module).__reduce_ex__(module, protocol)
        if not (isinstance(reduced, tuple) and len(reduced) >= 3 and isinstance(reduced[2], dict)):
            return reduced
        state = dict(reduced[2])
        state.pop(_GUARD, None)
        for key, value in state.items():
            if key.startswith(("_forward", "_backward")) and isinstance(value, dict):
                cleaned = type(value)((k, v) for k, v in value.items() if k not in self.ids)
                if len(cleaned) != len(value):
                    state[key] = cleaned
        return (reduced[0], reduced[1], state, *reduced[3:])
