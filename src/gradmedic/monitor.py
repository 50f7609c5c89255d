"""The Monitor: attaches probes to a model, records steps, hands them to the detectors.

Example:
    >>> import torch, gradmedic
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> with gradmedic.watch(model, opt, every=1) as mon:
    ...     for _ in range(3):
    ...         opt.zero_grad()
    ...         model(torch.randn(8, 3)).pow(2).mean().backward()
    ...         opt.step()
    >>> len(mon.history), mon.layers
    (3, ['0', '2'])
"""

from __future__ import annotations

import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmedic.context import model_context
from gradmedic.errors import GradmedicError
from gradmedic.forward_trace import ForwardTrace
from gradmedic.history import History, JsonlSink
from gradmedic.layers import RECURRENT_TYPES, LayerIndex, is_activation
from gradmedic.optimizer_facts import optimizer_facts
from gradmedic.passes import PassWatch
from gradmedic.probes.base import Probe
from gradmedic.probes.deltas import DeltaProbe
from gradmedic.probes.gradients import GradientProbe
from gradmedic.probes.lr_jump import LrJumpBound
from gradmedic.probes.updates import UPDATE_KEYS, UpdateProbe
from gradmedic.record import LazyRecord, NamedVector
from gradmedic.sharding import (
    data_parallel_group,
    defer_data_parallel,
    fill_deferred,
    finish_in_flight,
)

if TYPE_CHECKING:
    from types import FrameType

    from gradmedic.findings import Diagnosis

Schedule = Callable[[int], bool]

#: Default sampling of the costly probes, one step in this many (the first included):
#: with it, watch() checks every problem gradmedic knows at a few percent of a step.
DEFAULT_SAMPLING = {"activations": 20, "recurrent": 20}
#: Update ratios are measured on every one of the first this many recorded steps.
EARLY_UPDATES = 20
#: ... and on any step whose global gradient norm is this many times its running level.
NORM_JUMP = 10.0

_ACTIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()


def watch(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **options: Any
) -> Monitor:
    """Start monitoring ``model``'s gradient flow; use the result as a context manager.

    Shorthand for :class:`Monitor`, whose docstring lists the options.
    """
    return Monitor(model, optimizer, **options)


class Monitor:
    """Records per-layer gradient statistics of a model during training.

    Hooks only read: a monitored model's outputs and gradients are
    bit-identical to an unmonitored one's, and an internal failure disables
    monitoring with a warning instead of raising into the training loop.

    Args:
        model: The model to monitor.
        optimizer: If given, a record is taken just before each
            ``optimizer.step()`` (after any clipping; for closure-based steps,
            right after the closure); otherwise call ``monitor.step()`` after
            ``loss.backward()``.
        every: Record one step in ``every``, or a schedule ``f(step) -> bool``.
        history: Number of recorded steps kept in memory (a ring buffer).
        deltas: Record ||dL/d(layer output)|| and max |output| per layer (a model
            of more than 32 layers: an interleaved share of 32 per step, in turn).
        updates: Record parameter norms and update ratios ||dw|| / ||w||.
        update_every: Measure updates on one recorded step in this many (a
            measurement copies the parameters once); the first 20 recorded steps
            and any step whose gradient norm jumped 10x are measured too.
        activations: Record dead and saturated units of activation modules:
            an int ``n`` samples one step in ``n`` (the first one included),
            True every recorded step, False never.
        recurrent: Record ||dL/dh_t|| per time step of RNN/LSTM/GRU modules (on
            up to 4 sequences of the batch), on one step in ``n`` (True: every
            recorded step, False: never).
        spectra: Record the largest singular value of each layer's weight, on
            one recorded step in ``update_every`` (True) or in ``n``.
        sink: A JSONL file that receives every record, flushed as it is
            written; ``{rank}`` in the path becomes the torch.distributed rank.
        sink_batch: Write the sink's records this many at a time (and at least
            every 2 s, at close and at exit). 1 (default) writes each record at its
            step, so even a killed process loses nothing, at one host read per
            step; a larger batch makes the steps between writes free of host reads
            and a killed process loses at most the unwritten batch.
        probes: Extra probes to attach.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int | Schedule = 1,
        history: int = 1000,
        deltas: bool = True,
        updates: bool = True,
        update_every: int = 10,
        activations: bool | int = DEFAULT_SAMPLING["activations"],
        recurrent: bool | int = DEFAULT_SAMPLING["recurrent"],
        spectra: bool | int = False,
        sink: str | os.PathLike[str] | None = None,
        sink_batch: int = 1,
        probes: Iterable[Probe] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        if optimizer is not None and _steps_none_of(optimizer, model):
            warnings.warn(
                "gradmedic: the optimizer steps none of the model's parameters, so its updates "
                "and learning rates describe another model; build it over this model, e.g. "
                "torch.optim.SGD(model.parameters(), lr=0.01), or pass optimizer=None",
                stacklevel=3,
            )
        for flag, value in (("deltas", deltas), ("updates", updates)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        act_every = _sampling("activations", activations)
        rec_every = _sampling("recurrent", recurrent)
        # A torch.compile wrapper: watch the module it compiles (layer names without
        # "_orig_mod."), and keep the wrapper, whose own hooks run outside the graph.
        outer = model
        model = _compiled_inner(model)
        self._schedule = _as_schedule(every)
        self.update_every = _positive_int("update_every", update_every)
        spec_every = self.update_every if spectra is True else _sampling("spectra", spectra)
        self.history = History(history, on_evict=self._evicted)
        self.model = model
        self.optimizer = optimizer
        self.index = LayerIndex(model)
        self.steps = 0  # steps seen (recorded or not)
        self._first_nonfinite: dict[str, Any] | None = None
        self.disabled = False
        self.closed = False
        self.skipped = 0  # iterations whose step the optimizer skipped (GradScaler: inf)
        self.unstepped = 0  # backward passes no step of this monitor's followed (not steps)
        self._lr_jump = LrJumpBound()
        #: Parameters the optimizer steps that were added after watch() (not watched).
        self.unwatched: tuple[str, ...] = ()
        self._stepped_count = (
            sum(len(g["params"]) for g in optimizer.param_groups) if optimizer else 0
        )
        self._recorded = 0
        self._backward_done = False
        #: log of the running level of recorded global norms (a device tensor; NaN: none yet).
        self._log_level: torch.Tensor | None = None
        self._log_of: tuple[torch.Tensor, torch.Tensor] | None = None  # (norm, its log)
        self._loss_scale: torch.Tensor | None = None
        #: The GradScaler seen calling the optimizer, and its scale as the last backward ran.
        self._scaler: weakref.ref[Any] | None = None
        self._scale_at_backward: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._pending: dict[str, Any] | None = None
        self._pre_ran = False  # the optimizer's step pre-hook ran for the current step
        self._loss: torch.Tensor | float | None = None
        self._clip: dict[str, Any] | None = None
        self._handles: list[RemovableHandle] = []
        # The forward-order tracer (every submodule hooked) runs until the first record only.
        self._trace = ForwardTrace(model)
        self._order_fixed = False
        #: Modules in the order their forwards finished, from the first recorded step.
        self.forward_order: list[str] = []

        self._gradients = GradientProbe()
        self._updates = UpdateProbe() if updates else None
        extra = list(probes)
        for p in extra:
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be gradmedic Probe instances, got {type(p).__name__}")
        self.probes: list[Probe] = [self._gradients]
        if deltas:
            self.probes.append(DeltaProbe())
        if act_every and any(is_activation(m) for m in model.modules()):
            from gradmedic.probes.activations import ActivationProbe

            self.probes.append(ActivationProbe(every=act_every))
        if rec_every and any(isinstance(m, RECURRENT_TYPES) for m in model.modules()):
            from gradmedic.probes.recurrent import SAMPLED_SEQUENCES, RecurrentProbe

            self.probes.append(RecurrentProbe(every=rec_every, max_batch=SAMPLED_SEQUENCES))
        if spec_every:
            from gradmedic.probes.weight_spectra import WeightSpectraProbe

            self.probes.append(WeightSpectraProbe(every=spec_every))
        self.probes.extend(extra)
        if self._updates is not None:
            self.probes.append(self._updates)

        self._sink = (
            JsonlSink(
                sink,
                {"gradmedic": _version(), "layers": list(self.index.names)},
                batch=_positive_int("sink_batch", sink_batch),
            )
            if sink is not None
            else None
        )
        for probe in self.probes:
            probe.on_error = self._probe_failed
            probe.attach(self.index)
            probe.set_recording(self._schedule(0))
        self._trace.arm()
        layers = [layer.module for layer in self.index]
        self._passes = PassWatch(
            [outer, model, *layers[:1], *layers[-1:]],
            self._forward_started,
            self._backward_ended,
            roots=[outer, model],
            on_output=self._model_output,
        )
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))
        _ACTIVE.add(self)

    # ------------------------------------------------------------------ public API
    @property
    def layers(self) -> list[str]:
        """Layer names (modules owning parameters), input side first."""
        return list(self.index.names)

    def grad_norms(self) -> dict[str, float]:
        """The latest recorded per-layer gradient L2 norms (``{}`` before the first record)."""
        last = self.history.last()
        return dict(last.get("grad_norm", {})) if last else {}

    @property
    def first_nonfinite(self) -> dict[str, Any] | None:
        """Where the first NaN/Inf of the run appeared (``nonfinite_origin``), or None.

        Reading it reads the kept records (one host transfer each, once).
        """
        if self._first_nonfinite is None:
            self.history.rows()
        return self._first_nonfinite

    def note_loss(self, loss: torch.Tensor | float) -> None:
        """Attach the loss to the current step's record (read without a host sync)."""
        if self.closed:
            return
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record the current step (no optimizer attached): call after ``loss.backward()``."""
        if self.closed:
            self._warn_once(
                "closed",
                "gradmedic: monitor.step() after close() was ignored; the monitor records "
                "nothing once closed (its history and diagnose() stay available)",
            )
            return
        if self.optimizer is not None:
            warnings.warn(
                "gradmedic: this monitor records at optimizer.step() already; "
                "monitor.step() was ignored (use note_loss() to attach a loss)",
                stacklevel=2,
            )
            return
        if loss is not None:
            self.note_loss(loss)
        self._guarded(self._manual_step)

    def read_for_clip(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Called by gradmedic's norm clip before it scales: its L2 norms and the max |g|.

        The norms are the ones the clip would compute itself (None: the clip computes
        them); the maxima go back with :meth:`note_clip`, so the record reads nothing.
        """
        if self.disabled or self.closed or not self._recording():
            return None
        return self._gradients.read_for_clip(list(params), list(grads))

    def note_clip(
        self,
        grads: Sequence[torch.Tensor],
        per_param_norms: Sequence[torch.Tensor] | None,
        info: dict[str, Any],
        per_param_maxes: torch.Tensor | None = None,
    ) -> None:
        """Called by gradmedic's clipping: what was clipped, and norms to reuse.

        ``per_param_norms`` (and ``per_param_maxes``, max |g|) are pre-clip statistics
        of ``grads``; when the clip scales every gradient by ``info["scale"]`` the
        record reuses them.
        """
        if self.disabled or self.closed:
            return
        self._clip = dict(info)
        if per_param_norms is not None and "scale" in info:
            self._gradients.offer_norms(
                list(grads), list(per_param_norms), info["scale"], per_param_maxes
            )

    def diagnose(self, config: Any = None) -> Diagnosis:
        """Run every detector on the recorded history."""
        from gradmedic.diagnose import diagnose_rows

        context = model_context(self.model, self.layers, self.forward_order)
        context["optimizer"] = optimizer_facts(self.optimizer)
        context["monitor"] = self.coverage()
        context["trainable_layers"] = [
            layer.name
            for layer in self.index.layers
            if any(p.requires_grad for _, p in layer.params)
        ]
        half = {
            n: d for p in self.probes if isinstance(p, DeltaProbe) for n, d in p.float16.items()
        }
        if half:
            context["float16_layers"] = half  # layer -> device type
        packed = sorted(n for p in self.probes for n in getattr(p, "packed", ()))
        if packed:
            context["packed_recurrent"] = packed
        return diagnose_rows(self.history.rows(), config, layers=self.layers, context=context)

    def coverage(self) -> dict[str, Any]:
        """What this monitor measured: steps seen and recorded, probes on, what is off and why."""
        return {
            "steps_seen": self.steps,
            "records": self.history.total,
            "skipped_steps": self.skipped,
            "unstepped_backwards": self.unstepped,
            "unwatched_params": list(self.unwatched),
            "probes": [p.name for p in self.probes],
            "disabled": self.disabled,
            "closed": self.closed,
            "optimizer": self.optimizer is not None,
            "warnings": sorted(self._warned),
        }

    def close(self) -> None:
        """Remove every hook and close the sink. Safe to call twice.

        A closed monitor records nothing more; its history, ``diagnose()`` and
        ``grad_norms()`` stay available.
        """
        if not self.closed and not self.disabled and self._backward_done and self._pending is None:
            # the last backward pass was followed by no step: skipped, or no step at all
            self._guarded(self._abandon_iteration)
        self.closed = True
        try:
            finish_in_flight()  # sharded runs: no collective left in flight after close
        except Exception as exc:  # never raise from cleanup
            self._warn_once("close", f"gradmedic: a cross-rank reduction failed at close: {exc!r}")
        for h in self._handles:
            h.remove()
        self._handles = []
        self._trace.disarm()
        self._passes.remove()
        for probe in self.probes:
            try:
                probe.detach()
            except Exception as exc:  # never raise from cleanup
                warnings.warn(
                    f"gradmedic: probe {probe.name} failed to detach: {exc!r}", stacklevel=2
                )
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        _ACTIVE.discard(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def owns(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether every tensor in ``params`` is a parameter of the monitored model."""
        ids = {id(p) for p in self.index.params}
        return all(id(p) in ids for p in params)

    # ------------------------------------------------------------------ recording
    def _recording(self) -> bool:
        return not self.disabled and not self.closed and self._schedule(self.steps)

    def _samples_updates(self) -> bool | torch.Tensor:
        """Keep this step's update: early in the run, on schedule, or after a norm jump.

        The first ``EARLY_UPDATES`` recorded steps are all kept (a blow-up often
        starts there), then one in ``update_every``, and any step whose global
        gradient norm jumped ``NORM_JUMP`` times above the running level, the step
        that starts a blow-up. The jump is a device tensor (no host read): the
        update is measured anyway (a bounded copy) and the record drops it on read.
        """
        if self._updates is None:
            return False
        if self._recorded < EARLY_UPDATES or self._recorded % self.update_every == 0:
            return True
        log_total, level = self._log_total(), self._log_level
        if log_total is None or level is None:
            return False
        return log_total > level + math.log(NORM_JUMP)  # False while level is NaN

    def _log_total(self) -> torch.Tensor | None:
        """``log`` of the last recorded global norm (one kernel per step, for both rules)."""
        total = self._gradients.last_total
        if total is None:
            return None
        cached = self._log_of
        if cached is None or cached[0] is not total:
            cached = self._log_of = (total, total.log())
        return cached[1]

    def _track_norm_level(self) -> None:
        """A running geometric mean of recorded global norms (the jump rule's reference).

        Only the update sampling reads it: without the update probe, nothing is kept.
        """
        log_total = self._log_total() if self._updates is not None else None
        if log_total is None:
            return
        ok = torch.isfinite(log_total)  # a zero or non-finite norm leaves the level alone
        level = self._log_level
        if level is None or level.device != log_total.device:
            self._log_level = torch.where(ok, log_total, math.nan)  # NaN until a usable norm
            return
        new = torch.where(torch.isnan(level), log_total, torch.lerp(level, log_total, 0.1))
        self._log_level = torch.where(ok, new, level)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        self._pre_ran = True
        if not self._recording():
            return None
        self._guarded(self._check_new_params)
        scaler = _calling_grad_scaler()
        self._loss_scale = _scale_of(scaler)
        if self._loss_scale is not None:
            self._scaler = weakref.ref(scaler)
        # torch passes the step's own arguments with the optimizer first: (self, closure?).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):
            # The gradients do not exist yet: the optimizer computes them by calling the
            # closure (LBFGS, Lightning). Record right after its first call instead.
            wrapped = self._after_closure(closure)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs
        self._grads_ready()
        return None

    def _check_new_params(self) -> None:
        """Say once when the optimizer steps parameters added after watch() (unwatched)."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        count = sum(len(g["params"]) for g in groups)
        if count == self._stepped_count:
            return
        self._stepped_count = count
        own = {id(p) for p in self.index.params}
        new = [p for g in groups for p in g["params"] if id(p) not in own and p.requires_grad]
        if not new:
            return
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.unwatched = tuple(names.get(id(p), f"<parameter {tuple(p.shape)}>") for p in new)
        outside = not all(id(p) in names for p in new)
        fix = (
            "some are not the model's parameters (watch() follows the model's)"
            if outside
            else "close() it and watch() the model again to include them"
        )
        self._warn_once(
            "unwatched",
            f"gradmedic: the optimizer now steps {len(new)} parameter(s) added after watch() "
            f"({', '.join(self.unwatched[:3])}{', ...' if len(new) > 3 else ''}); the monitor "
            f"does not watch them: {fix}",
        )

    def _after_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        done = False

        def wrapped() -> Any:
            nonlocal done
            result = closure()
            if not done:
                done = True
                if self._loss is None and _is_scalar_loss(result):
                    self.note_loss(result)
                self._grads_ready()
            return result

        return wrapped

    def _grads_ready(self) -> None:
        self._guarded(self._collect)
        self._guarded(self._before_update)
        self._guarded(self._track_norm_level)

    def _before_update(self) -> None:
        if self.optimizer is not None and self._updates is not None:
            self._lr_jump.before(self.optimizer, self.index)
        keep = self._samples_updates()
        if self._updates is not None and keep is not False:
            self._updates.before(keep, advance=keep is True)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._pre_ran and self._pending is None and self._recording():
            # Attached during this very step (inside its closure: gradmedic run under
            # Lightning), so the pre-step hook never ran: the gradients it stepped on are
            # still there; only this step's update ratios are missing.
            self._guarded(self._collect)
        self._pre_ran = False
        if self._pending is not None and self._updates is not None and self._updates.pending:
            self._guarded(self._updates.after)
        self._guarded(self._finish_step)

    def _manual_step(self) -> None:
        if self._updates is not None and self._updates.pending:
            self._updates.after()
        if self._recording():
            self._collect()
            self._track_norm_level()
        self._finish_step()
        # Snapshot now so the next step() measures one update, if that step is recorded.
        if self._recording():
            self._before_update()

    def _collect(self) -> None:
        data: dict[str, Any] = {"step": self.steps}
        if not self._order_fixed:
            data["_forward_nonfinite"] = self._trace.take_flags()
            self._fix_order()
        self._gradients.loss_scale = self._loss_scale
        for probe in list(self.probes):
            if probe is self._updates:
                continue
            if probe is self._gradients:
                data.update(probe.collect(self.steps))
                continue
            try:
                data.update(probe.collect(self.steps))
            except Exception as exc:  # one probe's failure costs only its own statistics
                self._probe_failed(probe, exc)
        if self._loss_scale is not None:
            data["loss_scale"] = self._loss_scale
            _unscale_backward_stats(data, self._loss_scale)
        self._note_missing(data)
        defer_data_parallel(data, self.index.names, data_parallel_group(self.model))
        self._pending = data

    def _note_missing(self, data: dict[str, Any]) -> None:
        """Say once when a probe that is on gathered nothing although gradients exist."""
        deltas_on = any(isinstance(p, DeltaProbe) for p in self.probes)
        if deltas_on and "global_grad_norm" in data and "delta_norm" not in data:
            self._warn_once(
                "deltas",
                "gradmedic: no per-layer deltas (dL/d output) or output maxima were "
                "recorded: the forward pass ran inside a torch.compile graph (or not "
                "through the monitored modules). Gradient norms, updates and the "
                "diagnosis from them are still recorded.",
            )

    def _forward_started(self) -> None:
        """A forward pass begins: drop what an abandoned iteration left behind."""
        if self._backward_done and self._pending is None:
            try:
                abandoned = self._gradients.changed_since_snapshot()
            except Exception:
                abandoned = False
            if abandoned:
                self._guarded(self._abandon_iteration)

    def _abandon_iteration(self) -> None:
        """A backward pass whose gradients were cleared without an optimizer step.

        A skipped step (the GradScaler found inf/NaN: its scale dropped since the last
        record; before any record, the gradients were not finite) is a step and a
        ``skipped`` record. Any other backward is no step of this optimizer (a GAN's
        generator pass through the discriminator): it is forgotten.
        """
        if self._skipped_by_optimizer():
            self._skip_iteration()
        else:
            self.unstepped += 1
            self._reset_step()

    def _skipped_by_optimizer(self) -> bool:
        """Whether the GradScaler skipped this backward's step.

        Before any step: whether its gradients were not finite (which any scaler skips).
        A skip lowers the scaler's scale below the one the backward pass ran with, and the
        skipped optimizer's own gradients hold inf/NaN: a scaler shared by two optimizers
        (a GAN) lowers it for the other one's overflow too.
        """
        scaler = self._scaler() if self._scaler is not None else None
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, torch.Tensor) and self._scale_at_backward is not None:
            # host reads, where the GradScaler itself reads found_inf every step
            dropped = bool(scale.reshape(()) < self._scale_at_backward.to(scale.device))
            return dropped and self._gradients.snapshot_finite() is not True
        if self._recorded == 0:  # no step yet: an optimizer skips non-finite gradients
            return self._gradients.snapshot_finite() is False
        return False

    def _model_output(self, output: Any) -> None:
        """A forward of the whole model returned: keep its loss (HF models return one)."""
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if _is_scalar_loss(loss):
            self.note_loss(loss)

    def _backward_ended(self) -> None:
        self._backward_done = True
        # Once the step is recorded (a closure the optimizer calls again: LBFGS, SAM),
        # a later backward's gradients are not this record's: no snapshot holds them.
        if self._recording() and self._pending is None:
            self._guarded(self._gradients.snapshot)
            self._guarded(self._keep_backward_scale)

    def _keep_backward_scale(self) -> None:
        """The scale of the GradScaler seen earlier, as this backward ran (a device copy)."""
        scaler = self._scaler() if self._scaler is not None else None
        scale = getattr(scaler, "_scale", None)
        self._scale_at_backward = (
            scale.detach().clone().reshape(()) if isinstance(scale, torch.Tensor) else None
        )

    def _skip_iteration(self) -> None:
        """A backward pass whose gradients were cleared without an optimizer step."""
        self.skipped += 1
        row = {"step": self.steps, "skipped": True}
        record = LazyRecord(row)
        self.history.append(record)
        if self._sink is not None:
            self._sink.add(record)
        self._reset_step()
        self._advance()

    def _finish_step(self) -> None:
        data = self._pending
        if data is not None and not self.disabled:
            if self._updates is not None:
                data.update(self._updates.collect(self.steps))
                data.update(self._lr_jump.after(self.index))
            if self._loss is not None:
                data["loss"] = self._loss
            clip = _clip_field(self._clip, data)
            if clip is not None:
                data["clip"] = clip
            if self.optimizer is not None:
                data["lr"] = [_lr(g["lr"]) for g in self.optimizer.param_groups]
            record = LazyRecord(data, self._finalize)
            self.history.append(record)
            self._recorded += 1
            if self._sink is not None:
                self._sink.add(record)  # written in batches: no host read per step
        self._reset_step()
        self._advance()

    def _reset_step(self) -> None:
        """Forget the step in progress: its pending record, loss, clip and probe state."""
        self._pending = None
        self._loss = None
        self._clip = None
        self._backward_done = False
        self._loss_scale = None
        if not self._order_fixed:
            self._trace.take_flags()  # an unrecorded step's flags: the record is of a later one
        for probe in self.probes:
            probe.reset()

    def _advance(self) -> None:
        """Move to the next step (its probes record it or not)."""
        self.steps += 1
        recording = self._recording()
        for probe in self.probes:
            probe.set_recording(recording)

    def _finalize(self, row: dict[str, Any]) -> dict[str, Any]:
        """Order per-layer dicts input-to-output and locate the first non-finite value."""
        fill_deferred(row)  # statistics of sharded tensors, reduced over the ranks
        order = self.index.names
        for key in ("delta_norm", "output_max"):
            if key in row:
                vals = row[key]
                row[key] = {n: vals[n] for n in order if n in vals}
        backward = row.pop("_backward_order", [])
        grads_finite = row.pop("_grads_finite", True)
        if "recurrent" in row:
            from gradmedic.probes.recurrent import settle_isolated

            settle_isolated(row)
        if not row.pop("_updates_keep", True):
            for key in UPDATE_KEYS:
                row.pop(key, None)
        clip = row.get("clip")
        if isinstance(clip, dict) and "pre_norm" in clip and "kind" not in clip:
            # Gradients changed between backward and step; only a real reduction is clipping.
            pre, post = clip["pre_norm"], clip["post_norm"]
            if math.isfinite(pre) and post < pre * (1 - 1e-6) and not _cleared(row):
                clip.update(kind="external", clipped=True)
            else:
                del row["clip"]  # changed (unscaled, a gradient cleared) but not clipped
        elif isinstance(clip, dict) and "clipped" in clip:
            clip["clipped"] = bool(clip["clipped"])
        flags = row.pop("_forward_nonfinite", None)
        origin = _nonfinite_origin(row, order, backward, bool(grads_finite))
        module = flags.first() if origin is not None and flags is not None else None
        if module is not None:  # the module whose output was the first NaN/Inf (tracer)
            row["nonfinite_module"] = module
        row["nonfinite_origin"] = origin
        first = self._first_nonfinite
        if origin is not None and (first is None or origin["step"] < first["step"]):
            self._first_nonfinite = origin
        return row

    def _evicted(self, records: list[LazyRecord]) -> None:
        """Records leaving the history unread: look there for the first non-finite step.

        One host read for the whole chunk (is anything in each record non-finite?);
        only the records that say so are read in full.
        """
        if self._first_nonfinite is not None:
            return
        unread = [r for r in records if r.unread is not None]
        flags = [_maybe_nonfinite(r.unread) for r in unread]  # type: ignore[arg-type]
        known = [f for f in flags if isinstance(f, torch.Tensor)]
        values = iter(torch.stack([f.cpu() for f in known]).tolist() if known else [])
        for record, flag in zip(unread, flags, strict=True):
            if flag is None or next(values):
                record.to_dict()
                if self._first_nonfinite is not None:
                    return

    def _fix_order(self) -> None:
        self.forward_order = self._trace.order
        layers = set(self.index.names)
        seen = [name for name in self.forward_order if name in layers]
        if seen:
            self.index.set_forward_order(seen)
        self._order_fixed = True
        self._trace.disarm()

    # ------------------------------------------------------------------ failure
    def _guarded(self, fn: Callable[[], None]) -> None:
        if self.disabled:
            return
        try:
            fn()
        except Exception as exc:  # monitoring must never crash training
            self._fail(exc)

    def _probe_failed(self, probe: Probe, exc: BaseException) -> None:
        """A probe failed: switch that probe off, keep every other statistic."""
        if probe is self._gradients:
            self._fail(exc, where=f"probe {probe.name!r}")
            return
        if probe in self.probes:
            self.probes.remove(probe)
        if probe is self._updates:
            self._updates = None
        try:
            probe.detach()
        except Exception:  # cleanup of a broken probe must not raise either
            pass
        warnings.warn(
            f"gradmedic: probe {probe.name!r} failed ({exc!r}) and is off for the rest of "
            "this run; every other statistic is still recorded",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _fail(self, exc: BaseException, where: str = "monitor") -> None:
        self.disabled = True
        self._pending = None
        for probe in self.probes:
            try:  # what a probe holds for the failed step (gradients, copies) is let go
                probe.reset()
                probe.set_recording(False)
            except Exception:  # already failing: the warning below says so
                pass
        warnings.warn(
            f"gradmedic: {where} failed ({exc!r}); monitoring is off for the rest of this run, "
            f"the {len(self.history)} records taken so far are kept",
            RuntimeWarning,
            stacklevel=3,
        )


def find_monitor(params: Sequence[torch.Tensor]) -> Monitor | None:
    """The active monitor watching these parameters, if any (used by gradmedic's clipping)."""
    if not params:
        return None
    for mon in list(_ACTIVE):
        if not mon.disabled and mon.owns(params[:1]):
            return mon
    return None


def _maybe_nonfinite(data: Mapping[str, Any]) -> torch.Tensor | None:
    """A 0-d device flag: could this unread record hold a non-finite origin? (None: unsure)."""
    amax = data.get("_grad_max")
    if not isinstance(amax, torch.Tensor):
        return None  # sharded or custom gradient entries: read the record to know
    bad = ~(amax < math.inf).all()
    out_max = data.get("output_max")
    if isinstance(out_max, NamedVector):
        bad = bad | ~(out_max.values.to(amax.device) < math.inf).all()
    return bad


def _lr(value: Any) -> float | torch.Tensor:
    """A param group's learning rate; a tensor one (capturable optimizers) stays on device."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().reshape(())
    return float(value)


def _is_scalar_loss(value: Any) -> TypeGuard[torch.Tensor | float]:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, float) and not isinstance(value, bool)


def _steps_none_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Whether ``optimizer`` has parameters and none of them is one of ``model``'s."""
    own = {id(p) for p in model.parameters()}
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    return bool(own and stepped) and not any(id(p) in own for p in stepped)


def _compiled_inner(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", None)
    is_wrapper = type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module)
    return inner if is_wrapper else model  # type: ignore[return-value]


def _calling_grad_scaler() -> Any:
    """The ``torch.amp.GradScaler`` calling ``optimizer.step()``, if any (None)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "_maybe_opt_step":
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def _scale_of(scaler: Any) -> torch.Tensor | None:
    """The loss scale of an enabled GradScaler, copied (``scaler.update()`` changes it in place).

    ``GradScaler.step`` unscales the gradients before it calls the optimizer,
    but deltas and pre-clip norms were taken during the backward pass of the
    scaled loss.
    """
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor) and getattr(scaler, "_enabled", True):
        return scale.detach().clone().reshape(())
    return None


def _unscale_backward_stats(data: dict[str, Any], scale: torch.Tensor) -> None:
    """Divide statistics taken during the scaled backward pass by the loss scale."""
    delta = data.get("delta_norm")
    if isinstance(delta, NamedVector):
        values = delta.values / scale.to(device=delta.values.device, dtype=delta.values.dtype)
        data["delta_norm"] = NamedVector(delta.names, values)
    for profile in data.get("recurrent", {}).values():
        _unscale_nested(profile, scale)


def _unscale_nested(profile: dict[str, Any], scale: torch.Tensor) -> None:
    for key, value in profile.items():
        if key in ("dh_norm", "dc_norm", "dh_norm_last") and isinstance(value, torch.Tensor):
            profile[key] = value / scale.to(device=value.device, dtype=value.dtype)
        elif key == "streams" and isinstance(value, dict):
            for stream in value.values():
                if isinstance(stream, dict):
                    _unscale_nested(stream, scale)


def _cleared(row: Mapping[str, Any]) -> bool:
    """Whether some layer's gradient went from nonzero to exactly 0 before the step.

    No clipper does that (by norm: one factor for all; by value: a clamp): the loop
    cleared it (a layer frozen for a step), which is no clipping.
    """
    pre, post = row.get("pre_clip_grad_norm") or {}, row.get("grad_norm") or {}
    return any(post.get(k) == 0.0 and v > 0 for k, v in pre.items())


def _clip_field(info: dict[str, Any] | None, data: dict[str, Any]) -> dict[str, Any] | None:
    """The record's ``clip`` entry: what gradmedic's clipping reported, or what changed.

    When the gradients changed between the backward pass and the step (any
    clipper, or loss unscaling), both global norms are kept; finalization
    decides from them whether anything was clipped.
    """
    pre = data.pop("pre_clip_global_grad_norm", None)
    if pre is None:
        return info
    out = dict(info) if info is not None else {}
    out["pre_norm"] = pre
    out["post_norm"] = data.get("global_grad_norm")
    return out


def _nonfinite_origin(
    row: dict[str, Any], order: Sequence[str], backward: Sequence[str], grads_finite: bool = False
) -> dict[str, Any] | None:
    step = row.get("step")
    out_max = row.get("output_max", {})
    for name in order:
        if name in out_max and not math.isfinite(out_max[name]):
            return {"layer": name, "where": "forward", "step": step}
    if grads_finite:
        # A NaN/Inf delta makes every gradient below it NaN/Inf too; an inf delta norm
        # with finite gradients is a float32 sum of squares that overflowed.
        return None
    deltas = row.get("delta_norm", {})
    grads = row.get("grad_norm", {})
    for name in backward:
        if name in deltas and not math.isfinite(deltas[name]):
            # the output-most layer's delta comes from the loss: with its output finite,
            # the loss computation made the NaN/Inf (log of 0), no layer's backward did
            last = [n for n in order if n in grads][-1:]
            from_loss = name == backward[0] and name in out_max and [name] == last
            return {"layer": name, "where": "loss" if from_loss else "backward", "step": step}
    for name in reversed(order):
        if name in grads and not math.isfinite(grads[name]):
            return {"layer": name, "where": "gradient", "step": step}
    return None


def _sampling(name: str, value: bool | int) -> int:
    """0 (off), or sample one step in this many (True: 1)."""
    if value is True:
        return 1
    if value is False:
        return 0
    return _positive_int(name, value)


def _as_schedule(every: int | Schedule) -> Schedule:
    if callable(every):
        return every
    n = _positive_int("every", every)
    return lambda step: step % n == 0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _version() -> str:
    from gradmedic.version import __version__

    return __version__


__all__ = ["GradmedicError", "Monitor", "find_monitor", "watch"]
