"""Parametrized weights (spectral_norm) are read without advancing their power iteration.

In training mode every read of a ``spectral_norm`` weight updates its ``_u``/``_v``
buffers: a monitor reading it (weight spectra, the diagnosis' weight scales) would make
the run depend on being watched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import gradmedic
from gradmedic.layers import weight_of


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        spectral_norm(nn.Linear(8, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 16)), nn.ReLU(),
        nn.Linear(16, 1),
    )  # fmt: skip


def train(watched: bool) -> dict[str, torch.Tensor]:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    mon = gradmedic.watch(model, opt, spectra=1) if watched else None
    try:
        for step in range(6):
            x = torch.randn(32, 8, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if mon is not None and step == 2:
                mon.diagnose()  # mid-run: reads every layer's weight
    finally:
        if mon is not None:
            mon.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_watching_and_diagnosing_leave_a_spectral_norm_run_unchanged() -> None:
    bare, watched = train(False), train(True)
    assert bare.keys() == watched.keys()
    assert all(torch.equal(bare[k], watched[k]) for k in bare)  # the _u, _v buffers too


def test_weight_of_is_the_weight_without_touching_its_state() -> None:
    model = build()
    layer = model[0]
    u = layer.parametrizations.weight[0]._u.clone()
    w = weight_of(layer)
    assert torch.equal(layer.parametrizations.weight[0]._u, u) and layer.training
    layer.eval()
    assert torch.allclose(w, layer.weight)  # eval mode: W / sigma from the stored u, v
    assert weight_of(model[4]) is model[4].weight and weight_of(model[1]) is None
