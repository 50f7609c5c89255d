"""Gradient through time: ``||dL/dh_t||`` at every step of nn.RNN / nn.LSTM / nn.GRU.

A hook on a recurrent module's output sees ``dL/d(output_t)``, only the *direct*
part of the gradient at step ``t``; the total derivative also flows back from
step ``t+1`` through the recurrence, inside the fused RNN kernel where no hook
reaches. This probe therefore captures the module's input, initial state and the
gradients arriving at its outputs, and at record time re-runs the cell step by
step with the module's own (detached) weights, seeds the unrolled graph with the
captured output gradients and reads ``dL/dh_t`` (and ``dL/dc_t`` for LSTM) for
every step, layer and direction with :func:`torch.autograd.grad`. The model's
outputs, gradients and RNG are untouched.

Cell equations (PyTorch's documentation, gates stacked in this order):

* RNN: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``
* LSTM: ``i, f, g, o = sigma, sigma, tanh, sigma(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``,
  ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)`` (then ``W_hr h_t`` with ``proj_size``)
* GRU: ``r, z = sigma(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t-1} + b_h{r,z})``,
  ``n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))``, ``h_t = (1 - z) * n + z * h_{t-1}``
  (PyTorch's ``z`` is the fraction of the old state *kept*).

Dropout between layers is not replayed (the recomputation is the deterministic
network), and ``PackedSequence`` inputs are skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gradmedic.hooks import ModuleHooks
from gradmedic.layers import RECURRENT_TYPES, ROOT_NAME, LayerIndex
from gradmedic.probes.base import Probe
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

    Cost: one unrolled forward and backward (gradients of the states only) per
    recorded step and module, in Python-level steps, plus the spectra (reused while
    ``W_hh`` moves less than 1%, see :class:`~gradmedic.probes.spectra.RecurrentSpectra`);
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
            self._warn(key, f"recurrent probe: {key!r} got a PackedSequence; not measured")
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
        with torch.enable_grad():
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

    Re-runs ``module`` step by step on ``x`` with its detached weights, then
    backpropagates ``sum(out * seeds["out"]) + sum(h_n * seeds["h_n"]) +
    sum(c_n * seeds["c_n"])`` to every state with one :func:`torch.autograd.grad`.

    Args:
        module: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (its ``batch_first`` is ignored).
        x: Input, time-major ``(T, B, input_size)``.
        h0: Initial hidden state ``(L * D, B, H_out)`` or None for zeros.
        c0: Initial LSTM cell state ``(L * D, B, H)`` or None for zeros.
        seeds: ``dL/d(output)`` as ``"out"`` (time-major), ``"h_n"``, ``"c_n"``; missing
            keys count as zero.
        isolate: Also propagate only the seed at the last processed step
            (``dh_norm_last``), by running a second copy of the batch.

    Returns:
        ``{stream: {"dh_norm": (T,), "dc_norm": (T,), gate stats...}}`` as tensors.
    """
    batch = x.shape[1]
    if isolate:
        x = torch.cat([x, x], dim=1)
        h0 = None if h0 is None else torch.cat([h0, h0], dim=1)
        c0 = None if c0 is None else torch.cat([c0, c0], dim=1)
    dirs = 2 if module.bidirectional else 1
    h_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    lstm = module.mode == "LSTM"
    states: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]] = {}
    layer_in = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            stream = f"l{layer}" + ("_reverse" if d else "")
            k = layer * dirs + d
            h = x.new_zeros(x.shape[1], h_out) if h0 is None else h0[k]
            c = x.new_zeros(x.shape[1], module.hidden_size) if c0 is None else c0[k]
            h = h.detach().requires_grad_()  # makes the whole unrolled graph differentiable
            hs, cs, gate = _run_cell(module, stream, layer_in, h, c if lstm else None, bool(d))
            states[stream] = (hs, cs, gate)
            outs.append(torch.stack(hs))
            h_n.append(hs[0] if d else hs[-1])
            if lstm:
                c_n.append(cs[0] if d else cs[-1])
        layer_in = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]

    c_last = torch.stack(c_n) if lstm else None
    total = _seeded(layer_in, torch.stack(h_n), c_last, seeds, dirs, isolate)
    tensors = [t for hs, cs, _ in states.values() for t in (*hs, *cs)]
    grads = iter(torch.autograd.grad(total, tensors, allow_unused=True))

    result: dict[str, dict[str, torch.Tensor]] = {}
    for stream, (hs, cs, gate) in states.items():
        stats: dict[str, torch.Tensor] = {}
        g_h = _stack_grads([next(grads) for _ in hs], hs)
        g_c = _stack_grads([next(grads) for _ in cs], cs) if cs else None
        stats["dh_norm"] = _norms(g_h[:, :batch])
        if g_c is not None:
            stats["dc_norm"] = _norms(g_c[:, :batch])
        if isolate:
            stats["dh_norm_last"] = _norms(g_h[:, batch:])
            if g_c is not None:
                stats["dc_norm_last"] = _norms(g_c[:, batch:])
        if gate is not None:
            label = "forget_gate" if lstm else "update_gate"
            mean, std = mean_std(gate[:, :batch].flatten(1), dim=1)
            stats[f"{label}_mean"], stats[f"{label}_std"] = mean, std
        result[stream] = stats
    return result


def _seeded(
    out: torch.Tensor,
    h_n: torch.Tensor,
    c_n: torch.Tensor | None,
    seeds: dict[str, torch.Tensor],
    dirs: int,
    isolate: bool,
) -> torch.Tensor:
    """``<out, g_out> + <h_n, g_h> + <c_n, g_c>``.

    With ``isolate`` the second half of the batch keeps only the output gradient at
    each direction's last processed step (``t = T-1`` forward, ``t = 0`` reverse).
    """
    g_out = seeds.get("out")
    if g_out is not None and isolate:
        only_last = torch.zeros_like(g_out)
        width = g_out.shape[-1] // dirs
        only_last[-1, :, :width] = g_out[-1, :, :width]
        if dirs == 2:
            only_last[0, :, width:] = g_out[0, :, width:]
        g_out = torch.cat([g_out, only_last], dim=1)
    total = out.new_zeros(())
    if g_out is not None:
        total = total + (out * g_out).sum()
    for name, value in (("h_n", h_n), ("c_n", c_n)):
        g = seeds.get(name)
        if g is not None and value is not None:
            total = total + (value * (torch.cat([g, g], dim=1) if isolate else g)).sum()
    return total


def _norms(grads: torch.Tensor) -> torch.Tensor:
    # float64: squaring a 1e-25 float32 gradient underflows, and vanishing profiles get there
    return torch.linalg.vector_norm(grads.flatten(1), dim=1, dtype=torch.float64)


def _stack_grads(grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(
        [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]
    )


def _run_cell(
    module: nn.RNNBase,
    stream: str,
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    reverse: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Unroll one layer/direction; states are returned in time order.

    Fused where PyTorch offers it (few autograd nodes per step): biases folded into
    the input projections, ``addmm`` for the recurrent product, one sigmoid over all
    LSTM gates, ``addcmul`` for the cell update, ``lerp`` for the GRU state mix.
    """
    w_ih = getattr(module, f"weight_ih_{stream}").detach()
    w_hh_t = getattr(module, f"weight_hh_{stream}").detach().T
    b_ih = _bias(module, f"bias_ih_{stream}")
    b_hh = _bias(module, f"bias_hh_{stream}")
    w_hr = getattr(module, f"weight_hr_{stream}", None)
    w_hr = None if w_hr is None else w_hr.detach()
    hidden = module.hidden_size
    mode = module.mode
    xi = F.linear(x, w_ih, b_ih)  # all input projections in one matmul
    if b_hh is not None and mode != "GRU":
        xi = xi + b_hh
    # One view per time step, taken once: indexing the projections by t inside the loop
    # makes the backward of every step zero-fill a gradient the size of all of them (they
    # require grad above layer 0); those fills were 40% of an LSTM LM's recomputation.
    steps = xi.unbind(0)
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    hs: list[torch.Tensor] = []
    cs: list[torch.Tensor] = []
    gates: list[torch.Tensor] = []
    for t in order:
        if mode == "LSTM":
            pre = torch.addmm(steps[t], h, w_hh_t)
            i, f, _, o = torch.sigmoid(pre).chunk(4, dim=-1)
            c_prev = cast(torch.Tensor, c)  # an LSTM always carries a cell state
            c = torch.addcmul(f * c_prev, i, torch.tanh(pre[:, 2 * hidden : 3 * hidden]))
            h = o * torch.tanh(c)
            if w_hr is not None:
                h = F.linear(h, w_hr)
            cs.append(c)
            gates.append(f.detach())
        elif mode == "GRU":
            gh = torch.mm(h, w_hh_t) if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
            r, z = torch.sigmoid(steps[t][:, : 2 * hidden] + gh[:, : 2 * hidden]).chunk(2, dim=-1)
            n = torch.tanh(torch.addcmul(steps[t][:, 2 * hidden :], r, gh[:, 2 * hidden :]))
            h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
            gates.append(z.detach())
        else:
            pre = torch.addmm(steps[t], h, w_hh_t)
            h = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
        hs.append(h)
    if reverse:
        hs.reverse()
        cs.reverse()
        gates.reverse()
    return hs, cs, (torch.stack(gates) if gates else None)


def _bias(module: nn.RNNBase, name: str) -> torch.Tensor | None:
    b = getattr(module, name, None)
    return None if b is None else b.detach()
