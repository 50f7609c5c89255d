"""Largest singular value of each layer's weight matrix, sampled.

A layer's Jacobian is ``diag(phi'(z)) W``, so ``sigma_max(W)`` bounds how much
one layer can amplify the backpropagated gradient (times ``max |phi'|``).
Conv kernels are read as ``(out_channels, in_channels * kernel)`` matrices,
which bounds the per-position map. Power iteration is warm-started from the
previous record's vector, so a slowly changing weight needs few iterations.
"""

from __future__ import annotations

from typing import Any

import torch

from gradmedic.layers import LayerIndex, weight_of
from gradmedic.probes.base import Probe
from gradmedic.probes.spectra import PowerState, spectral_norm
from gradmedic.record import NamedVector


class WeightSpectraProbe(Probe):
    """``weight_sigma_max`` per layer with a ``weight`` of 2 or more dimensions.

    Args:
        every: Measure on one recorded step in this many.
        iters: Power-iteration steps per measurement (matrices with a side of
            at most 256 are decomposed exactly).
    """

    name = "spectra"

    def __init__(self, every: int = 10, iters: int = 10) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.iters = iters
        self._index: LayerIndex | None = None
        self._states: dict[str, PowerState] = {}
        self._calls = 0

    def attach(self, index: LayerIndex) -> None:
        """Remember the layers; no hooks."""
        self._index = index

    def collect(self, step: int) -> dict[str, Any]:
        """Sigma max of each weight matrix, on one recorded step in ``every``."""
        self._calls += 1
        if self._index is None or (self._calls - 1) % self.every:
            return {}
        names, values = [], []
        with torch.no_grad():
            for layer in self._index:
                w = weight_of(layer.module)
                if not isinstance(w, torch.Tensor) or w.dim() < 2:
                    continue
                state = self._states.setdefault(layer.name, PowerState())
                values.append(spectral_norm(w.reshape(w.shape[0], -1), state, self.iters))
                names.append(layer.name)
        if not values:
            return {}
        device = values[0].device
        vec = torch.stack([v.to(device=device, dtype=torch.float64) for v in values])
        return {"weight_sigma_max": NamedVector(tuple(names), vec)}

    def detach(self) -> None:
        """Forget the warm-start vectors."""
        self._index = None
        self._states = {}
