"""Backpropagation through time by hand, for one layer and direction of an RNN/LSTM/GRU.

Only the gradients of the states are taken (not the weights'), with no autograd graph:
everything runs under ``torch.no_grad()``. :meth:`Recurrence.forward` runs the
recurrence step by step in its processing order (time order, or reversed for the
reverse direction), keeps what the backward needs and then takes the local derivatives
of all steps in a few batched ops; :meth:`Recurrence.backward` then walks the steps
back doing only the products that carry the gradient one step further.

Notation: ``a`` is a pre-activation (gates stacked in PyTorch's order), ``W`` the
recurrent weight ``W_hh``, ``g_t`` the direct gradient arriving at ``h_t`` (from the
loss or the layer above), ``dh_t``/``dc_t`` the total derivatives, ``t-1`` the
previously processed step, ``s' = s (1 - s)`` for a sigmoid ``s``, ``u' = 1 - u^2``
for ``u = tanh(.)``. Each backward step ends with ``dh_{t-1} = g_{t-1} + (...) W``:

* RNN, ``h_t = act(a_t)``: ``da_t = dh_t act'`` (``1 - h_t^2``, or ``[h_t > 0]``
  for ReLU), ``dh_{t-1} = g_{t-1} + da_t W``.
* LSTM, ``c_t = f c_{t-1} + i g``, ``h_t = W_hr (o tanh c_t)`` (``W_hr = 1`` without
  ``proj_size``): ``dm_t = dh_t W_hr``, ``dc_t = dc_{t+1} f_{t+1} + dm_t o tanh'(c_t)``,
  ``da_t = [dc_t g i', dc_t c_{t-1} f', dc_t i g', dm_t tanh(c_t) o']``,
  ``dh_{t-1} = g_{t-1} + da_t W``.
* GRU, ``n = tanh(a_n + r (W_hn h_{t-1} + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``:
  ``da_n = dh_t (1 - z) n'``, ``da_z = dh_t (h_{t-1} - n) z'``,
  ``da_r = da_n (W_hn h_{t-1} + b_hn) r'``, and
  ``dh_{t-1} = g_{t-1} + z dh_t + [da_r, da_z, r da_n] W``.

Every ``da_t`` is ``dh_t`` (or ``dc_t``, ``dm_t``) times a factor known after the
forward, so the factors are batched over all steps and each backward step costs a
handful of ops, written into buffers allocated once. The gradient of the layer's input
is ``da W_ih`` for all steps in one matmul (:meth:`Recurrence.input_gradient`).

The backward's seeds may stack several copies of the forward's batch along dim 1 (the
recurrent probe's isolated profile is a second copy with other seeds): the copies
share the forward and its factors, which broadcast over them. Memory is a few times
``T * B * hidden`` per stream; the forward computes its gates in place in the input
projections' buffer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StreamWeights:
    """One layer/direction's parameters; ``stream`` is the suffix, as in ``weight_ih_l0``."""

    ih: torch.Tensor
    hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    hr: torch.Tensor | None  # LSTM projection (proj_size > 0)

    @classmethod
    def of(cls, module: nn.RNNBase, stream: str) -> StreamWeights:
        """The parameters of ``stream`` in ``module`` (used in place, never modified)."""
        return cls(
            ih=getattr(module, f"weight_ih_{stream}"),
            hh=getattr(module, f"weight_hh_{stream}"),
            b_ih=getattr(module, f"bias_ih_{stream}", None),
            b_hh=getattr(module, f"bias_hh_{stream}", None),
            hr=getattr(module, f"weight_hr_{stream}", None),
        )


@dataclass(frozen=True)
class StateGrads:
    """Total derivatives of one stream's states, time-ordered, ``copies * B`` sequences."""

    dh: torch.Tensor  # (T, copies * B, H_out)
    dc: torch.Tensor | None  # LSTM cell state (T, copies * B, H)
    d_pre: torch.Tensor | None  # (T, copies * B, gates * H): dL/d(W_ih x_t + b_ih)


class Recurrence:
    """One layer/direction: a forward keeping what its backward through time needs.

    Call :meth:`forward` once, then :meth:`backward` (any number of times).

    Args:
        weights: The stream's parameters.
        reverse: Process the sequence from its last step to its first.
    """

    #: Name of the gate recorded in :attr:`gate` ("forget_gate", "update_gate") or None.
    gate_label: ClassVar[str | None] = None

    def __init__(self, weights: StreamWeights, reverse: bool) -> None:
        self.w = weights
        self.reverse = reverse
        self.gate: torch.Tensor | None = None  # (T, B, H) after forward, gated cells

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None) -> torch.Tensor:
        """Run on ``x`` ``(T, B, input)`` from ``h0`` (and ``c0``); return ``h_t`` (T, B, H_out)."""
        raise NotImplementedError

    def backward(
        self,
        seed: torch.Tensor,
        seed_h: torch.Tensor | None,
        seed_c: torch.Tensor | None,
        input_grad: bool = True,
    ) -> StateGrads:
        """Total derivatives given ``g_t`` (``seed``, T x copies*B x H_out) and the last state's.

        ``seed_h`` / ``seed_c`` (``copies * B`` rows) join the last processed step. Without
        ``input_grad`` the pre-activation gradients are not kept (no :meth:`input_gradient`).
        """
        raise NotImplementedError

    def input_gradient(self, grads: StateGrads) -> torch.Tensor:
        """``dL/dx_t`` for every step: one matmul of the pre-activation gradients by ``W_ih``."""
        assert grads.d_pre is not None, "backward(..., input_grad=True) first"
        return torch.matmul(grads.d_pre, self.w.ih)

    def _order(self, steps: int) -> range:
        return range(steps - 1, -1, -1) if self.reverse else range(steps)

    def _previous(self, states: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """``states`` (time-ordered) one processed step earlier: ``first`` before the first."""
        if self.reverse:
            return torch.cat([states[1:], first.unsqueeze(0)])
        return torch.cat([first.unsqueeze(0), states[:-1]])

    def _start(self, seed: torch.Tensor, seed_h: torch.Tensor | None) -> tuple[torch.Tensor, range]:
        """``dh`` buffer with its last processed step set, and the processing order."""
        order = self._order(seed.shape[0])
        dh = torch.empty(seed.shape, dtype=seed.dtype, device=seed.device)
        last = order[-1]
        if seed_h is None:
            dh[last] = seed[last]
        else:
            torch.add(seed[last], seed_h, out=dh[last])
        return dh, order


def _backward_steps(order: Sequence[int]) -> Iterator[tuple[int, int | None]]:
    """``(t, previously processed t)`` from the last processed step back; None at the first."""
    back = list(reversed(order))
    return zip(back, [*back[1:], None], strict=True)


def _per_step(buffer: torch.Tensor, *shape: int) -> tuple[torch.Tensor, ...]:
    """One view of ``buffer`` per time step, shaped ``shape``: taken once, outside the loop."""
    return buffer.view(buffer.shape[0], *shape).unbind(0)


def _every_step(views: tuple[torch.Tensor, ...], steps: int) -> tuple[torch.Tensor, ...]:
    """``views`` of a ``(T, ...)`` buffer, or its single step reused at every step."""
    return views if len(views) == steps else views * steps


def _input_projections(x: torch.Tensor, w: StreamWeights, with_b_hh: bool) -> torch.Tensor:
    """``W_ih x_t + b_ih`` (``+ b_hh`` when it adds directly) for every step, one matmul."""
    xi = F.linear(x, w.ih, w.b_ih)
    if with_b_hh and w.b_hh is not None:
        xi += w.b_hh
    return xi


def _sigmoid_slope(s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``s (1 - s)``: the sigmoid's derivative from its output."""
    return torch.addcmul(s, s, s, value=-1, out=out)


def _tanh_slope(u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - u^2``: tanh's derivative from its output."""
    return torch.mul(u, u, out=out).neg_().add_(1)


class RNNRecurrence(Recurrence):
    """``h_t = tanh(a_t)`` or ``relu(a_t)``, ``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``."""

    def __init__(self, weights: StreamWeights, reverse: bool, relu: bool) -> None:
        super().__init__(weights, reverse)
        self.relu = relu

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None) -> torch.Tensor:
        """Run on ``x`` and keep ``act'(a_t)``; return ``h_t``."""
        out = _input_projections(x, self.w, with_b_hh=True)  # becomes h_t in place
        rows, w_hh_t = out.unbind(0), self.w.hh.T
        act = torch.Tensor.relu_ if self.relu else torch.Tensor.tanh_
        h = h0
        for t in self._order(len(rows)):
            h = act(rows[t].addmm_(h, w_hh_t))
        self._slope = out.gt(0).to(out.dtype) if self.relu else _tanh_slope(out)
        return out

    def backward(
        self,
        seed: torch.Tensor,
        seed_h: torch.Tensor | None,
        seed_c: torch.Tensor | None,
        input_grad: bool = True,
    ) -> StateGrads:
        """``da_t = dh_t act'``, ``dh_{t-1} = g_{t-1} + da_t W_hh``."""
        dh, order = self._start(seed, seed_h)
        steps, batch, hidden = self._slope.shape
        copies = seed.shape[1] // batch
        d_pre = dh.new_empty(steps if input_grad else 1, *dh.shape[1:])
        dh_c = _per_step(dh, copies, batch, hidden)
        da_c = _every_step(_per_step(d_pre, copies, batch, hidden), steps)
        da_rows = _every_step(d_pre.unbind(0), steps)
        dh_rows, g_rows, slope = dh.unbind(0), seed.unbind(0), self._slope.unbind(0)
        for t, prev in _backward_steps(order):
            torch.mul(dh_c[t], slope[t], out=da_c[t])
            if prev is not None:
                torch.addmm(g_rows[prev], da_rows[t], self.w.hh, out=dh_rows[prev])
        return StateGrads(dh, None, d_pre if input_grad else None)


class LSTMRecurrence(Recurrence):
    """LSTM cell, gates ``i, f, g, o``, optional projection ``h_t = W_hr (o tanh c_t)``."""

    gate_label = "forget_gate"

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None) -> torch.Tensor:
        """Run on ``x`` from ``(h0, c0)``, keep the gates and cell states; return ``h_t``."""
        assert c0 is not None, "an LSTM carries a cell state"
        act = _input_projections(x, self.w, with_b_hh=True)  # becomes i, f, g, o in place
        steps, batch, hidden = act.shape[0], act.shape[1], c0.shape[-1]
        w_hh_t = self.w.hh.T
        w_hr_t = None if self.w.hr is None else self.w.hr.T
        cells, tanh_c = act.new_empty(steps, batch, hidden), act.new_empty(steps, batch, hidden)
        out = act.new_empty(steps, batch, h0.shape[-1])
        pre = act.new_empty(batch, 4 * hidden)  # one step's pre-activations, reused
        pre_g = pre[:, 2 * hidden : 3 * hidden]
        gates, c_t, tc_t, h_t = act.unbind(0), cells.unbind(0), tanh_c.unbind(0), out.unbind(0)
        i, f, g, o = (gate.unbind(0) for gate in act.chunk(4, dim=-1))
        h, c = h0, c0
        for t in self._order(steps):
            torch.addmm(gates[t], h, w_hh_t, out=pre)
            torch.sigmoid(pre, out=gates[t])
            torch.tanh(pre_g, out=g[t])
            c = torch.addcmul(f[t] * c, i[t], g[t], out=c_t[t])
            tc = torch.tanh(c, out=tc_t[t])
            if w_hr_t is None:
                h = torch.mul(o[t], tc, out=h_t[t])
            else:
                h = torch.mm(o[t] * tc, w_hr_t, out=h_t[t])
        self._save_factors(act, cells, tanh_c, c0)
        return out

    def _save_factors(
        self, act: torch.Tensor, c: torch.Tensor, tanh_c: torch.Tensor, c0: torch.Tensor
    ) -> None:
        """Local derivatives of all steps: ``dc_t/dm_t``, ``da_{i,f,g}/dc_t``, ``da_o/dm_t``."""
        i, f, g, o = act.chunk(4, dim=-1)
        self.gate = f.contiguous()  # the carry dc_t f_t; releases the gates' buffer
        self._dc_dm = _tanh_slope(tanh_c).mul_(o)
        self._da_dm = _sigmoid_slope(o).mul_(tanh_c)
        self._da_dc = c.new_empty(*c.shape[:2], 3, c.shape[-1])
        da_i, da_f, da_g = self._da_dc.unbind(2)
        _sigmoid_slope(i, out=da_i).mul_(g)
        _sigmoid_slope(f, out=da_f).mul_(self._previous(c, c0))
        _tanh_slope(g, out=da_g).mul_(i)

    def backward(
        self,
        seed: torch.Tensor,
        seed_h: torch.Tensor | None,
        seed_c: torch.Tensor | None,
        input_grad: bool = True,
    ) -> StateGrads:
        """``dc_t``, ``da_t`` and ``dh_{t-1} = g_{t-1} + da_t W_hh`` from the last step back."""
        assert self.gate is not None, "forward first"
        dh, order = self._start(seed, seed_h)
        steps, batch, hidden = self.gate.shape
        copies, h_out = seed.shape[1] // batch, seed.shape[-1]
        dc = seed.new_empty(steps, copies, batch, hidden)
        d_pre = seed.new_empty(steps if input_grad else 1, copies, batch, 4, hidden)
        dm_rows = seed.new_empty(copies * batch, hidden)  # dh_t W_hr, with a projection
        dh_rows, g_rows, dc_t = dh.unbind(0), seed.unbind(0), dc.unbind(0)
        dh_c, dc_col = _per_step(dh, copies, batch, h_out), _per_step(dc, copies, batch, 1, hidden)
        da_rows = _every_step(_per_step(d_pre, copies * batch, 4 * hidden), steps)
        da_ifg = _every_step(d_pre[:, :, :, :3].unbind(0), steps)
        da_o = _every_step(d_pre[:, :, :, 3].unbind(0), steps)
        dc_dm, da_dc, da_dm = (v.unbind(0) for v in (self._dc_dm, self._da_dc, self._da_dm))
        forget = self.gate.unbind(0)
        carry = (  # dc_{t+1} f_{t+1}
            dc.new_zeros(copies, batch, hidden)
            if seed_c is None
            else seed_c.view(copies, batch, hidden)
        )
        for t, prev in _backward_steps(order):
            if self.w.hr is None:
                dm = dh_c[t]
            else:
                dm = torch.mm(dh_rows[t], self.w.hr, out=dm_rows).view(copies, batch, hidden)
            torch.addcmul(carry, dm, dc_dm[t], out=dc_t[t])
            torch.mul(dc_col[t], da_dc[t], out=da_ifg[t])
            torch.mul(dm, da_dm[t], out=da_o[t])
            if prev is not None:
                torch.addmm(g_rows[prev], da_rows[t], self.w.hh, out=dh_rows[prev])
                carry = dc_t[t] * forget[t]
        rows = copies * batch
        d_in = d_pre.view(steps, rows, 4 * hidden) if input_grad else None
        return StateGrads(dh, dc.view(steps, rows, hidden), d_in)


class GRURecurrence(Recurrence):
    """GRU cell, gates ``r, z, n``; ``z`` is the fraction of the old state kept."""

    gate_label = "update_gate"

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None) -> torch.Tensor:
        """Run on ``x`` from ``h0``, keep ``r, z, n`` and ``W_hn h + b_hn``; return ``h_t``."""
        act = _input_projections(x, self.w, with_b_hh=False)  # becomes r, z, n in place
        hidden = h0.shape[-1]
        gh = torch.empty_like(act)  # W_hh h_{t-1} + b_hh
        out = act.new_empty(act.shape[0], act.shape[1], hidden)
        a_rz, a_n = act[..., : 2 * hidden].unbind(0), act[..., 2 * hidden :].unbind(0)
        r, z = act[..., :hidden].unbind(0), act[..., hidden : 2 * hidden].unbind(0)
        gh_rows, gh_rz, gh_n = (
            gh.unbind(0),
            gh[..., : 2 * hidden].unbind(0),
            gh[..., 2 * hidden :].unbind(0),
        )
        w_hh_t, b_hh, h_t = self.w.hh.T, self.w.b_hh, out.unbind(0)
        h = h0
        for t in self._order(len(h_t)):
            if b_hh is None:
                torch.mm(h, w_hh_t, out=gh_rows[t])
            else:
                torch.addmm(b_hh, h, w_hh_t, out=gh_rows[t])
            a_rz[t].add_(gh_rz[t]).sigmoid_()
            n = a_n[t].addcmul_(r[t], gh_n[t]).tanh_()
            h = torch.lerp(n, h, z[t], out=h_t[t])  # (1 - z) * n + z * h
        self._save_factors(act, gh[..., 2 * hidden :], self._previous(out, h0))
        return out

    def _save_factors(self, act: torch.Tensor, gh_n: torch.Tensor, h_prev: torch.Tensor) -> None:
        """Local derivatives of all steps: ``da/dh_t`` on the input and the hidden side."""
        r, z, n = act.chunk(3, dim=-1)
        self.gate = z.contiguous()
        self._da_dh = n.new_empty(*n.shape[:2], 3, n.shape[-1])  # of W_ih x + b_ih
        da_r, da_z, da_n = self._da_dh.unbind(2)
        _tanh_slope(n, out=da_n).addcmul_(da_n, z, value=-1)  # (1 - z) n'
        _sigmoid_slope(z, out=da_z).mul_(h_prev.sub_(n))
        _sigmoid_slope(r, out=da_r).mul_(gh_n).mul_(da_n)
        self._dgh_dh = self._da_dh.clone()  # of W_hh h + b_hh: r scales W_hn h + b_hn
        self._dgh_dh[:, :, 2].mul_(r)

    def backward(
        self,
        seed: torch.Tensor,
        seed_h: torch.Tensor | None,
        seed_c: torch.Tensor | None,
        input_grad: bool = True,
    ) -> StateGrads:
        """``dh_{t-1} = g_{t-1} + z dh_t + [da_r, da_z, r da_n] W_hh`` from the last step back."""
        assert self.gate is not None, "forward first"
        dh, order = self._start(seed, seed_h)
        steps, batch, hidden = self.gate.shape
        copies = seed.shape[1] // batch
        d_gh = seed.new_empty(steps, copies, batch, 3, hidden)
        dh_rows, g_rows, dgh_rows = (
            dh.unbind(0),
            seed.unbind(0),
            _per_step(d_gh, copies * batch, 3 * hidden),
        )
        dh_c, dh_col = _per_step(dh, copies, batch, hidden), _per_step(dh, copies, batch, 1, hidden)
        dgh_c, dgh_dh, keep = d_gh.unbind(0), self._dgh_dh.unbind(0), self.gate.unbind(0)
        for t, prev in _backward_steps(order):
            if prev is None:
                break
            torch.mul(dh_col[t], dgh_dh[t], out=dgh_c[t])
            torch.addmm(g_rows[prev], dgh_rows[t], self.w.hh, out=dh_rows[prev])
            dh_c[prev].addcmul_(dh_c[t], keep[t])
        if not input_grad:
            return StateGrads(dh, None, None)
        d_pre = dh.view(steps, copies, batch, 1, hidden) * self._da_dh.unsqueeze(1)
        return StateGrads(dh, None, d_pre.view(steps, copies * batch, 3 * hidden))


def recurrence(module: nn.RNNBase, stream: str, reverse: bool) -> Recurrence:
    """The :class:`Recurrence` of ``module``'s layer/direction ``stream`` (``"l1_reverse"``)."""
    weights = StreamWeights.of(module, stream)
    if module.mode == "LSTM":
        return LSTMRecurrence(weights, reverse)
    if module.mode == "GRU":
        return GRURecurrence(weights, reverse)
    return RNNRecurrence(weights, reverse, relu=module.mode == "RNN_RELU")
