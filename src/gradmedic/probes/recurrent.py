"""Gradient through time: ``||dL/dh_t||`` at every step of nn.RNN / nn.LSTM / nn.GRU.

A hook on a recurrent module's output sees ``dL/d(output_t)``, only the *direct*
part of the gradient at step ``t``; the total derivative also flows back from
step ``t+1`` through the recurrence, inside the fused RNN kernel where no hook
reaches. This probe therefore captures the module's input, initial state and the
gradients arriving at its outputs, and at record time re-runs the cell step by
step with the module's own weights and backpropagates the captured output
gradients through time by hand (:mod:`gradmedic.probes.bptt`, no autograd graph),
reading ``dL/dh_t`` (and ``dL/dc_t`` for LSTM) at every step, layer and direction.
The model's outputs, parameters, gradients and RNG are untouched.

Cell equations (PyTorch's documentation, gates stacked in this order):

* RNN: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``
* LSTM: ``i, f, g, o = sigma, sigma, tanh, sigma(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``,
  ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)`` (then ``W_hr h_t`` with ``proj_size``)
* GRU: ``r, z = sigma(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t-1} + b_h{r,z})``,
  ``n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))``, ``h_t = (1 - z) * n + z * h_{t-1}``
  (PyTorch's ``z`` is the fraction of the old state *kept*).

Backward, with ``g_t`` the gradient arriving at ``h_t`` from the loss or the layer
above, ``s' = s (1 - s)`` for a sigmoid, ``u' = 1 - u^2`` for a tanh and
``W = W_hh``: every cell ends a step with ``dh_{t-1} = g_{t-1} + da_t W`` (GRU:
``+ z dh_t`` and ``r`` scaling the ``n`` block), where

* RNN: ``da_t = dh_t act'(a_t)``;
* LSTM: ``dm_t = dh_t W_hr``, ``dc_t = dc_{t+1} f_{t+1} + dm_t o tanh'(c_t)``,
  ``da_t = [dc_t g i', dc_t c_{t-1} f', dc_t i g', dm_t tanh(c_t) o']``;
* GRU: ``da_n = dh_t (1 - z) n'``, ``da_z = dh_t (h_{t-1} - n) z'``,
  ``da_r = da_n (W_hn h_{t-1} + b_hn) r'``.

The factors multiplying ``dh_t`` / ``dc_t`` are taken for all steps at once after the
forward, the layer input's gradient ``da W_ih`` in one matmul; the layer below is
seeded with it (summed over directions). Streams are processed in their own order
(the reverse direction from ``t = T-1`` down); ``h_n`` / ``c_n`` seeds join each
stream's last processed step.

Dropout between layers is not replayed (the recomputation is the deterministic
network), and ``PackedSequence`` inputs are skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gradmedic.hooks import ModuleHooks
from gradmedic.layers import RECURRENT_TYPES, ROOT_NAME, LayerIndex
from gradmedic.probes.base import Probe
from gradmedic.probes.bptt import Recurrence, StateGrads, recurrence
from gradmedic.probes.spectra import RecurrentSpectra
from gradmedic.tensorlists import mean_std

#: Sequences the monitor's recurrent probe recomputes: the per-step gain through time is a
#: ratio of norms, which a few sequences measure as well as the batch, and the unrolled
#: recomputation's cost then stops growing with the batch. Measured on 50-step sequences
#: (tanh/ReLU RNN, LSTM, GRU, hidden 64): the gain fitted on 4 sequences was within 1.3% of
#: the one on all 64, its total over the sequence within 2x (the thresholds are 1e3); 8
#: sequences cost an LSTM LM's recomputation 1.5x the time of 4.
SAMPLED_SEQUENCES = 4


@dataclass
class _Capture:
    """What one recorded forward of a recurrent module left for the recomputation."""

    x: torch.Tensor  # (T, B, input), time-major, sampled, detached
    hx: torch.Tensor | None  # (L * D, B, H_out) or None
    cx: torch.Tensor | None  # LSTM cell state (L * D, B, H) or None
    batched: bool
    batch_first: bool
    versions: tuple[int, ...]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # "out" / "h_n" / "c_n"


class RecurrentProbe(Probe):
    """Records ``||dL/dh_t||`` per time step for every recurrent module.

    The record key ``"recurrent"`` maps each module's qualified name to::

        {"kind": "rnn" | "lstm" | "gru", "nonlinearity": "tanh" | "relu",
         "hidden_size": H, "seq_len": T, "num_layers": L, "bidirectional": bool,
         "batch": sequences used,
         "dh_norm": [T], "dc_norm": [T] (LSTM),
         "forget_gate_mean"/"forget_gate_std": [T] (LSTM),
         "update_gate_mean"/"update_gate_std": [T] (GRU, PyTorch's z),
         "sigma_max": float, "spectral_radius": float,
         "streams": {"l0": {same per-step keys + sigma_max, spectral_radius}, ...}}

    Lists are indexed by time step ``t`` (input order). ``dh_norm[t]`` is the L2 norm
    over the sampled sequences of the total derivative ``dL/dh_t``. The top-level
    per-step keys and spectra are those of the last layer's forward direction
    (stream ``"l{L-1}"``); ``streams`` holds every layer/direction, named like
    PyTorch's parameter suffixes (``"l0"``, ``"l0_reverse"``, ...). The spectra are
    those of the candidate block of ``W_hh`` (see :mod:`gradmedic.probes.spectra`).
    When the model's loss also reads outputs before the last step, a second profile
    ``dh_norm_last`` (and ``dc_norm_last``) propagates only the gradient arriving
    at the last processed step, isolating how the recurrence scales it.

    Cost: one unrolled forward and hand-written backward (gradients of the states
    only, no autograd) per recorded step and module, in Python-level steps (about 7
    small ops forward and 5 backward per time step of an LSTM), plus the spectra
    (reused while ``W_hh`` moves less than 1%, see
    :class:`~gradmedic.probes.spectra.RecurrentSpectra`);
    a few host synchronisations at record time. Use ``every`` or ``max_batch`` to
    bound it (``benchmarks/recurrent_overhead.py``).

    Args:
        every: Record one step in ``every`` (on top of the monitor's own schedule);
            None or 1 records every step the monitor records.
        max_batch: Recompute on at most this many sequences (None: all).

    Example:
        >>> from gradmedic.layers import LayerIndex
        >>> from gradmedic.record import materialize
        >>> rnn = torch.nn.RNN(3, 4)
        >>> probe = RecurrentProbe()
        >>> probe.attach(LayerIndex(rnn))
        >>> out, _ = rnn(torch.randn(5, 2, 3))
        >>> out[-1].sum().backward()
        >>> rec = materialize(probe.collect(0))
        >>> len(rec["recurrent"]["<root>"]["dh_norm"])
        5
        >>> probe.detach()
    """

    name = "recurrent"

    def __init__(self, every: int | None = None, max_batch: int | None = None) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
        self.every = every or 1
        self.max_batch = max_batch
        self._modules: dict[str, nn.RNNBase] = {}
        self._spectra: dict[str, RecurrentSpectra] = {}
        self._captures: dict[str, _Capture] = {}
        self._hooks = ModuleHooks()
        self._recording = True
        self._step = 0
        self._warned: set[str] = set()
        #: Recurrent modules that ran on a PackedSequence (their profile is not measured).
        self.packed: set[str] = set()

    # ---- Probe interface -------------------------------------------------
    def attach(self, index: LayerIndex) -> None:
        """Hook every ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` of ``index.model``."""
        for name, module in index.model.named_modules():
            if isinstance(module, RECURRENT_TYPES):
                key = name or ROOT_NAME
                self._modules[key] = module
                self._spectra[key] = RecurrentSpectra()
                self._hooks.forward(module, self._forward_hook(key), with_kwargs=True)

    def set_recording(self, recording: bool) -> None:
        """Skip capturing on steps the monitor will not record."""
        self._recording = recording

    def collect(self, step: int) -> dict[str, Any]:
        """Recompute the unrolled modules of this step and return their profiles."""
        self._step = step
        out: dict[str, Any] = {}
        for key, cap in self._captures.items():
            module = self._modules[key]
            if not cap.grads:
                continue  # the module's outputs got no gradient this step
            if cap.versions != _versions(module):
                self._warn(
                    key,
                    f"recurrent probe: the weights of {key!r} changed between its forward and "
                    "the record; record before optimizer.step() (gradmedic.watch does this)",
                )
                continue
            out[key] = self._profile(key, module, cap)
        self._captures.clear()
        return {"recurrent": out} if out else {}

    def reset(self) -> None:
        """Drop this step's captures and advance the probe's step counter."""
        self._captures.clear()
        self._step += 1

    def detach(self) -> None:
        """Remove every hook and forget captured tensors."""
        self._hooks.remove()
        self._captures.clear()
        self._modules.clear()

    # ---- capture ---------------------------------------------------------
    def _active(self) -> bool:
        return self._recording and self._step % self.every == 0 and torch.is_grad_enabled()

    def _forward_hook(self, key: str) -> Callable[..., None]:
        def hook(module: nn.RNNBase, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._active():
                return
            try:
                self._on_forward(key, module, args, kwargs, output)
            except Exception as exc:  # monitoring must never break training
                if self.on_error is None:
                    raise
                self.on_error(self, exc)

        return hook

    def _on_forward(
        self, key: str, module: nn.RNNBase, args: tuple, kwargs: dict, output: Any
    ) -> None:
        x: Any = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if isinstance(x, PackedSequence):
            self.packed.add(key)
            self._warn(
                key,
                f"gradmedic: {key!r} ran on a PackedSequence, whose gradient through time "
                "is not measured",
            )
            return
        out, state = output
        h_n, c_n = state if isinstance(state, tuple) else (state, None)
        if not (out.requires_grad or h_n.requires_grad):
            return
        cap = self._capture(module, x, hx)
        self._captures[key] = cap
        for name, tensor in (("out", out), ("h_n", h_n), ("c_n", c_n)):
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(_store(cap.grads, name))

    def _capture(self, module: nn.RNNBase, x: torch.Tensor, hx: Any) -> _Capture:
        batched = x.dim() == 3
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        x = x.detach()
        if not batched:
            x = x.unsqueeze(0 if module.batch_first else 1)
            h0 = None if h0 is None else h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
        if module.batch_first:
            x = x.transpose(0, 1)
        n = self.max_batch
        if n is not None:
            x = x[:, :n]
            h0 = None if h0 is None else h0[:, :n]
            c0 = None if c0 is None else c0[:, :n]
        return _Capture(
            x=x,
            hx=None if h0 is None else h0.detach(),
            cx=None if c0 is None else c0.detach(),
            batched=batched,
            batch_first=module.batch_first,
            versions=_versions(module),
        )

    def _seed_grads(self, cap: _Capture) -> dict[str, torch.Tensor]:
        """Captured output gradients in the recomputation's layout (time-major, sampled)."""
        grads = {}
        for name, g in cap.grads.items():
            if name == "out":
                if not cap.batched:
                    g = g.unsqueeze(0 if cap.batch_first else 1)
                if cap.batch_first:
                    g = g.transpose(0, 1)
                grads[name] = g[:, : cap.x.shape[1]]
            else:
                grads[name] = (g if cap.batched else g.unsqueeze(1))[:, : cap.x.shape[1]]
        return grads

    # ---- recomputation ---------------------------------------------------
    def _profile(self, key: str, module: nn.RNNBase, cap: _Capture) -> dict[str, Any]:
        seeds = self._seed_grads(cap)
        early = _reads_early_steps(seeds.get("out"), 2 if module.bidirectional else 1)
        # Whether the loss read early outputs is a device flag: the isolated profile is
        # always computed and dropped on read when it would equal dh_norm (no host read).
        isolate = early is not None
        streams = unrolled_gradients(module, cap.x, cap.hx, cap.cx, seeds, isolate)
        for stream, stats in streams.items():
            stats["sigma_max"], stats["spectral_radius"] = self._spectra[key](module, stream)
        last = streams[f"l{module.num_layers - 1}"]
        kind = module.mode.lower() if module.mode in ("LSTM", "GRU") else "rnn"
        return {
            "kind": kind,
            "nonlinearity": getattr(module, "nonlinearity", "tanh"),
            "hidden_size": module.hidden_size,
            "seq_len": cap.x.shape[0],
            "num_layers": module.num_layers,
            "bidirectional": module.bidirectional,
            "batch": cap.x.shape[1],
            **last,
            "streams": streams,
            "_isolated": early if early is not None else False,
        }

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _reads_early_steps(g_out: torch.Tensor | None, dirs: int) -> torch.Tensor | None:
    """Whether the loss reads outputs before each direction's last processed step.

    Only then does ``dh_norm`` mix in direct terms and the isolated profile differ.
    A 0-d device tensor (no host read), or None when it cannot (one step, no output).
    """
    if g_out is None or g_out.shape[0] < 2:
        return None
    width = g_out.shape[-1] // dirs
    early = g_out[:-1, :, :width].ne(0).any()
    if dirs == 2:
        early = early | g_out[1:, :, width:].ne(0).any()
    return early


_ISOLATED_KEYS = ("dh_norm_last", "dc_norm_last")


def settle_isolated(row: dict[str, Any]) -> None:
    """On read: drop each profile's isolated norms where the loss read no early output."""
    for profile in (row.get("recurrent") or {}).values():
        if not isinstance(profile, dict) or profile.pop("_isolated", True):
            continue
        for stats in (profile, *(profile.get("streams") or {}).values()):
            for key in _ISOLATED_KEYS:
                stats.pop(key, None)


def _store(sink: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        # Summed over backward passes of the step (several losses, accumulation).
        sink[name] = grad.detach() if name not in sink else sink[name] + grad.detach()

    return hook


def _versions(module: nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in module.parameters(recurse=False))


def unrolled_gradients(
    module: nn.RNNBase,
    x: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    seeds: dict[str, torch.Tensor],
    isolate: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-step gradient norms of an unrolled recurrent module.

    Re-runs ``module`` step by step on ``x`` with its weights and backpropagates
    ``sum(out * seeds["out"]) + sum(h_n * seeds["h_n"]) + sum(c_n * seeds["c_n"])``
    through time by hand (:mod:`gradmedic.probes.bptt`), layer by layer from the top,
    to every state. No autograd graph is built; parameters, ``.grad`` and RNG are untouched.

    Args:
        module: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (its ``batch_first`` is ignored).
        x: Input, time-major ``(T, B, input_size)``.
        h0: Initial hidden state ``(L * D, B, H_out)`` or None for zeros.
        c0: Initial LSTM cell state ``(L * D, B, H)`` or None for zeros.
        seeds: ``dL/d(output)`` as ``"out"`` (time-major), ``"h_n"``, ``"c_n"``; missing
            keys count as zero.
        isolate: Also propagate only the seed at the last processed step
            (``dh_norm_last``), as a second copy of the seeds sharing the forward.

    Returns:
        ``{stream: {"dh_norm": (T,), "dc_norm": (T,), gate stats...}}`` as tensors.
    """
    with torch.no_grad():
        cells = _run_forward(module, x, h0, c0)
        grads = _backpropagate(module, cells, *_output_seeds(module, x, seeds, isolate))
        return {s: _stream_stats(cells[s], grads[s], isolate) for s in cells}


def _stream_name(layer: int, direction: int) -> str:
    return f"l{layer}" + ("_reverse" if direction else "")


def _output_width(module: nn.RNNBase) -> int:
    """``H_out``: the projection size of a projected LSTM, else the hidden size."""
    return module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size


def _twice(t: torch.Tensor | None) -> torch.Tensor | None:
    """The batch (dim 1) twice: the second copy carries the isolated profile's seeds."""
    return None if t is None else torch.cat([t, t], dim=1)


def _run_forward(
    module: nn.RNNBase, x: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None
) -> dict[str, Recurrence]:
    """Every layer/direction run forward (each keeping its local derivatives), bottom up."""
    dirs = 2 if module.bidirectional else 1
    batch, h_out = x.shape[1], _output_width(module)
    lstm = module.mode == "LSTM"
    cells: dict[str, Recurrence] = {}
    layer_in = x
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            h = x.new_zeros(batch, h_out) if h0 is None else h0[k]
            c = x.new_zeros(batch, module.hidden_size) if c0 is None else c0[k]
            stream = _stream_name(layer, d)
            cell = cells[stream] = recurrence(module, stream, reverse=bool(d))
            outs.append(cell.forward(layer_in, h, c if lstm else None))
        layer_in = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
    return cells


def _output_seeds(
    module: nn.RNNBase, x: torch.Tensor, seeds: dict[str, torch.Tensor], isolate: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``dL/d(out)`` (zeros when absent), ``dL/dh_n``, ``dL/dc_n`` for the batch ``x``.

    With ``isolate`` every seed is stacked twice along the batch; the second copy keeps
    only the output gradient at each direction's last processed step (``t = T-1``
    forward, ``t = 0`` reverse).
    """
    dirs = 2 if module.bidirectional else 1
    g_h, g_c = (None if g is None else g.to(x.dtype) for g in (seeds.get("h_n"), seeds.get("c_n")))
    g_out = seeds.get("out")
    if g_out is None:
        g_out = x.new_zeros(x.shape[0], x.shape[1], dirs * _output_width(module))
    g_out = g_out.to(x.dtype)
    if not isolate:
        return g_out, g_h, g_c
    only_last = torch.zeros_like(g_out)
    width = g_out.shape[-1] // dirs
    only_last[-1, :, :width] = g_out[-1, :, :width]
    if dirs == 2:
        only_last[0, :, width:] = g_out[0, :, width:]
    return torch.cat([g_out, only_last], dim=1), _twice(g_h), _twice(g_c)


def _backpropagate(
    module: nn.RNNBase,
    cells: dict[str, Recurrence],
    g_out: torch.Tensor,
    g_h: torch.Tensor | None,
    g_c: torch.Tensor | None,
) -> dict[str, StateGrads]:
    """Every stream's state gradients, top layer down.

    A layer's output gradient is split between its directions; the gradient of its
    input (summed over the directions that read it) is the output gradient of the layer
    below. ``h_n`` / ``c_n`` seeds go to each stream's last processed state.
    """
    dirs = 2 if module.bidirectional else 1
    grads: dict[str, StateGrads] = {}
    for layer in reversed(range(module.num_layers)):
        width = g_out.shape[-1] // dirs
        streams = [_stream_name(layer, d) for d in range(dirs)]
        for d, stream in enumerate(streams):
            k = layer * dirs + d
            grads[stream] = cells[stream].backward(
                g_out[..., d * width : (d + 1) * width],
                None if g_h is None else g_h[k],
                None if g_c is None else g_c[k],
                input_grad=layer > 0,
            )
        if layer:
            parts = [cells[s].input_gradient(grads[s]) for s in streams]
            g_out = parts[0] if dirs == 1 else parts[0].add_(parts[1])
    return grads


def _stream_stats(cell: Recurrence, grads: StateGrads, isolate: bool) -> dict[str, torch.Tensor]:
    """Per-step norms of the state gradients (and of the isolated copy's), gate statistics."""
    copies = 2 if isolate else 1
    dh = _norms(grads.dh, copies)
    dc = None if grads.dc is None else _norms(grads.dc, copies)
    stats = {"dh_norm": dh[0]}
    if dc is not None:
        stats["dc_norm"] = dc[0]
    if isolate:
        stats["dh_norm_last"] = dh[1]
        if dc is not None:
            stats["dc_norm_last"] = dc[1]
    if cell.gate is not None and cell.gate_label is not None:
        mean, std = mean_std(cell.gate.flatten(1), dim=1)
        stats[f"{cell.gate_label}_mean"], stats[f"{cell.gate_label}_std"] = mean, std
    return stats


def _norms(grads: torch.Tensor, copies: int) -> torch.Tensor:
    """``(copies, T)``: the L2 norm at every step of each batch copy of ``(T, copies * B, ...)``."""
    # float64: squaring a 1e-25 float32 gradient underflows, and vanishing profiles get there
    per_copy = grads.reshape(grads.shape[0], copies, -1)
    return torch.linalg.vector_norm(per_copy, dim=2, dtype=torch.float64).T.contiguous()
