"""A gradient through time that is exactly 0 before the last step is vanishing (gain 0).

One blown-up step makes W_hh huge; every tanh unit then saturates (tanh' is 0 in float32)
and nothing passes back through time: no slope to fit, but a vanishing-in-time finding
with total gain 0, and the explosion that caused it recovered at that record.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.diagnose.in_time import cut_in_time


class Classifier(nn.Module):
    def __init__(self, radius: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True)
        self.head = nn.Linear(32, 2)
        with torch.no_grad():
            w = torch.randn(32, 32)
            w *= radius / torch.linalg.eigvals(w).abs().max()
            self.rnn.weight_hh_l0.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_a_saturated_rnn_passes_nothing_back_and_is_vanishing_in_time() -> None:
    torch.manual_seed(0)
    model = Classifier(radius=3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt) as mon:
        for _ in range(41):
            x = torch.randn(16, 60, 4)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0, 0] > 0).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    profiles = [r["recurrent"]["rnn"] for r in mon.history.rows() if "recurrent" in r]
    assert len(profiles) >= 2 and profiles[-1]["sigma_max"] > 1e3  # one step blew W_hh up
    last = profiles[-1]["dh_norm"]
    assert last[-1] > 0 and all(v == 0.0 for v in last[:-1])  # nothing passes back
    diagnosis = mon.diagnose()
    (vanishing,) = diagnosis.by_problem("vanishing_in_time")
    assert vanishing.severity.value == "critical" and vanishing.evidence["total_gain"] == 0.0
    assert "exactly 0 at every one of the 59 steps" in vanishing.explanation
    (exploding,) = diagnosis.by_problem("exploding_in_time")
    assert exploding.episode.onset == 0 and exploding.episode.recovery is not None


def test_cut_in_time_needs_the_last_step_and_only_zeros_before() -> None:
    assert cut_in_time([0.5, 0.0, 0.0])
    assert not cut_in_time([0.5, 0.1, 0.0])  # a decay to 0: the fit sees it
    assert not cut_in_time([0.0, 0.0, 0.0])  # no gradient at all: nothing to judge
    assert not cut_in_time([0.5])


def test_a_decay_at_w_hhs_spectral_radius_is_blamed_on_w_hh_not_saturation() -> None:
    from gradmedic.diagnose.in_time import fit_stream
    from gradmedic.diagnose.vanishing_in_time import explain

    profile = [0.6**k for k in range(40)][::-1]  # dh_norm oldest step first: 0.6 per step back
    entry = {"dh_norm": profile, "sigma_max": 1.1, "spectral_radius": 0.61}
    fit = fit_stream("rnn", "l0", [entry], {"kind": "rnn", "nonlinearity": "tanh"}, 1e-3, 5)
    assert fit is not None and abs(fit.per_step_gain - 0.6) < 1e-6
    text = explain(fit, 1e-3)
    assert "the decay comes from W_hh" in text and "saturation" not in text
    saturated = fit_stream(
        "rnn", "l0", [{**entry, "spectral_radius": 1.3}], {"kind": "rnn"}, 1e-3, 5
    )
    assert "saturation" in explain(saturated, 1e-3)


def test_an_rnn_on_packed_sequences_says_its_time_profile_was_not_checked() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    rnn, head = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 2)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="ran on a PackedSequence"):
        with gradmedic.watch(model, opt) as mon:
            for _ in range(3):
                x = pack_padded_sequence(torch.randn(4, 6, 3), [6, 5, 3, 2], batch_first=True)
                _, h = rnn(x)
                opt.zero_grad()
                nn.functional.cross_entropy(head(h[-1]), torch.tensor([0, 1, 0, 1])).backward()
                opt.step()
    diagnosis = mon.diagnose()
    why = diagnosis.coverage.not_checked["vanishing_in_time"]
    assert "'rnn' ran on a PackedSequence" in why
    assert any(
        w.startswith("Not checked: 'rnn' ran on a PackedSequence") for w in diagnosis.warnings
    )
