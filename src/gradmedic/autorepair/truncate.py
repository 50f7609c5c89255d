"""Truncated backpropagation through time for the recurrent layers of any model.

While the context is active, every ``nn.RNN``/``nn.LSTM``/``nn.GRU`` runs its
sequence in chunks of ``steps`` time steps and detaches the hidden state
between chunks: the forward output is the same, but the gradient reaching a
time step passes through at most ``steps`` recurrent Jacobians, so a product
of ``T`` factors ``W_h^T diag(phi')`` is cut to ``steps`` factors (seed 002).
The module objects, names and hooks stay in place, so a monitor sees the same
layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gradmedic.layers import RECURRENT_TYPES


def _detach(hidden: Any) -> Any:
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)
    return hidden.detach()


def _chunked(rnn: nn.RNNBase, forward: Callable[..., Any], steps: int) -> Callable[..., Any]:
    time_dim = 1 if rnn.batch_first else 0

    def run(x: Any, hx: Any = None) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[time_dim] <= steps:
            return forward(x, hx)  # packed or short sequences: nothing to cut
        outputs = []
        hidden = hx
        chunks = x.split(steps, dim=time_dim)
        for i, chunk in enumerate(chunks):
            out, hidden = forward(chunk, hidden)
            outputs.append(out)
            if i < len(chunks) - 1:
                hidden = _detach(hidden)
        return torch.cat(outputs, dim=time_dim), hidden

    return run


@contextmanager
def truncated_bptt(model: nn.Module, steps: int | None) -> Iterator[nn.Module]:
    """Run the model's recurrent layers with BPTT truncated to ``steps`` (None: no change).

    Example:
        >>> rnn = nn.RNN(2, 3, batch_first=True)
        >>> x = torch.randn(1, 6, 2)
        >>> with truncated_bptt(rnn, 2):
        ...     out, _ = rnn(x)
        >>> torch.allclose(out, rnn(x)[0])
        True
    """
    if steps is None:
        yield model
        return
    if steps < 1:
        raise ValueError(f"truncate_bptt steps must be >= 1, got {steps}")
    patched = [m for m in model.modules() if isinstance(m, RECURRENT_TYPES)]
    for module in patched:
        module.forward = _chunked(module, module.forward, steps)  # type: ignore[method-assign]
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
