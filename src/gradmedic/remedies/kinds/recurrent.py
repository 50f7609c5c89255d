"""Remedies for gradients through time (claims R8, R9 and truncated BPTT)."""

from __future__ import annotations

import torch
from torch import nn

from gradmedic.findings import Remedy
from gradmedic.layers import RECURRENT_TYPES
from gradmedic.remedies import init, surgery
from gradmedic.remedies.base import RemedyKind


class GateRecurrent(RemedyKind):
    """Replace nn.RNN by a gated cell of the same sizes (``gate_lstm``, ``gate_gru``)."""

    name, pattern, needs = "gate_recurrent", r"gate_\w+", (nn.RNN,)
    stage, group, where, assigns = 0, "gate", "model", True
    summary, default_args = (
        "replace nn.RNN by nn.LSTM or nn.GRU of the same sizes",
        (("lstm",), ("gru",)),
    )
    call = "model = gradmedic.surgery.gate_recurrent(model, {kind!r})"

    def remedy(self, kind: str = "lstm", why: str = "") -> Remedy:
        """Replace nn.RNN by a gated cell (LSTM/GRU) of the same sizes."""
        text = f"Replace nn.RNN by nn.{kind.upper()} of the same sizes"
        return self.build(text, why, self.call.format(kind=kind), f"gate_{kind}", kind=kind)

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """A copy of ``model`` with gated cells."""
        return surgery.gate_recurrent(model, remedy.params.get("kind", "lstm"))


class ForgetBias(RemedyKind):
    """Set the LSTM forget-gate bias so the cell keeps its state (``forget_bias``)."""

    name, stage, group, where = "forget_bias", 5, "forget_bias", "model"
    needs, default_args = (nn.LSTM,), ((1.0,),)
    summary = "set the LSTM forget-gate bias (forget gate near 1)"
    text = "Set the LSTM forget-gate bias to {value:g} (forget gate near 1)"
    call = "gradmedic.init.forget_gate_bias_(model, {value:g})"

    def remedy(self, value: float = 1.0, why: str = "") -> Remedy:
        """Set the LSTM forget-gate bias so the cell keeps its state by default."""
        return self.make(why, value=float(value))

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        """``model`` with its forget-gate biases set in place."""
        init.forget_gate_bias_(model, remedy.params.get("value", 1.0))
        return model


class TruncateBPTT(RemedyKind):
    """Backpropagate through at most a number of time steps (``truncate_bptt``)."""

    name, stage, group, where = "truncate_bptt", 14, "truncate", "loop"
    needs, default_args = RECURRENT_TYPES, ((10,),)
    setting, convert = ("truncate_bptt", "steps"), int
    summary = "truncate backpropagation through time (detach the hidden state)"
    text = "Truncate backpropagation through time to {steps} steps (detach the hidden state)"
    call = "h = h.detach()  # every {steps} steps"

    def remedy(self, steps: int, why: str = "") -> Remedy:
        """Backpropagate through at most ``steps`` time steps."""
        return self.make(why, steps=int(steps))
