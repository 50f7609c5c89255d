"""In-time detectors on real recurrent models and on hand-made profiles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.exploding_in_time import detect as detect_exploding
from gradmedic.diagnose.in_time import horizon, log_gain, processing_order, time_profiles
from gradmedic.diagnose.vanishing_in_time import detect as detect_vanishing
from gradmedic.diagnose.vanishing_in_time import forget_bias_for
from gradmedic.findings import Problem, Severity
from gradmedic.probes.recurrent import SAMPLED_SEQUENCES

CONFIG = DiagnosisConfig()


class Last(nn.Module):
    """A recurrent module and a linear head on its last output."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


def watched_rows(rnn, seq_len, batch=16, steps=2):
    """Train ``steps`` steps under a monitor; also return the last step's input and weights."""
    model = Last(rnn)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradmedic.watch(model, opt, recurrent=True) as mon:
        for _ in range(steps):
            opt.zero_grad()
            x = torch.randn(seq_len, batch, rnn.input_size)
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model(x).pow(2).mean().backward()
            opt.step()
        diagnosis = mon.diagnose()
        rows = mon.history.rows()
    return (weights, x), diagnosis, rows


def in_time(diagnosis):
    return [
        f
        for f in diagnosis.findings
        if f.problem in (Problem.VANISHING_IN_TIME, Problem.EXPLODING_IN_TIME)
    ]


def scaled_orthogonal(rnn, scale):
    nn.init.orthogonal_(rnn.weight_hh_l0)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(scale)
    return rnn


def fitted_gain(norms_in_time_order):
    back = np.log(norms_in_time_order[::-1])
    return math.exp(np.polyfit(np.arange(len(back)), back, 1)[0])


def test_tanh_rnn_half_orthogonal_vanishes_with_the_measured_gain():
    rnn = scaled_orthogonal(nn.RNN(8, 32), 0.5)
    (w, x), diagnosis, _ = watched_rows(rnn, seq_len=80)
    (finding,) = in_time(diagnosis)
    assert finding.problem is Problem.VANISHING_IN_TIME and finding.layers == ["rnn"]
    ev = finding.evidence

    # independent: the recorded step unrolled by hand in float64, h_t keeping their grads
    x = x.double()
    W, U = w["rnn.weight_hh_l0"].double(), w["rnn.weight_ih_l0"].double()
    b = (w["rnn.bias_ih_l0"] + w["rnn.bias_hh_l0"]).double()
    h = torch.zeros(16, 32, dtype=torch.float64, requires_grad=True)
    hs = []
    for t in range(80):
        h = torch.tanh(x[t] @ U.T + h @ W.T + b)
        h.retain_grad()
        hs.append(h)
    y = hs[-1] @ w["head.weight"].double().T + w["head.bias"].double()
    y.pow(2).mean().backward()
    want = fitted_gain(np.array([h.grad.norm().item() for h in hs]))
    assert ev["per_step_gain"] == pytest.approx(want, rel=0.10)
    # Pascanu et al.: gain <= gamma * sigma_max = 1 * 0.5
    assert ev["sigma_max"] == pytest.approx(0.5, rel=1e-3)
    assert ev["spectral_radius"] == pytest.approx(0.5, rel=1e-3)
    assert ev["per_step_gain"] < 0.5
    assert ev["seq_len"] == 80 and len(ev["profile"]) == 80
    assert ev["horizon"] is not None and ev["horizon"] < 80
    # the horizon is where the recorded profile first drops below 1e-3 of the last step
    back = ev["profile"][::-1]
    assert back[ev["horizon"]] < 1e-3 * back[0] <= min(back[: ev["horizon"]])
    assert finding.severity is Severity.CRITICAL  # 0.45^79 ~ 1e-27 < 1e-6
    assert "0.5 < 1/gamma = 1" in finding.explanation
    names = [r.name for r in finding.remedies]
    assert names[:2] == ["gate_lstm", "gate_gru"] and "orthogonal_init" in names
    trunc = next(r for r in finding.remedies if r.name == "truncate_bptt")
    assert trunc.params["steps"] == ev["horizon"]


def test_relu_rnn_double_orthogonal_explodes():
    rnn = scaled_orthogonal(nn.RNN(8, 32, nonlinearity="relu"), 2.0)
    _, diagnosis, rows = watched_rows(rnn, seq_len=40)
    (finding,) = in_time(diagnosis)
    assert finding.problem is Problem.EXPLODING_IN_TIME
    ev = finding.evidence
    assert ev["per_step_gain"] > 1 and ev["end_ratio"] > 1e3
    assert ev["sigma_max"] == pytest.approx(2.0, rel=1e-3)
    assert ev["spectral_radius"] == pytest.approx(2.0, rel=1e-3)
    assert "rho = 2 (> 1)" in finding.explanation
    clip = finding.remedies[0]
    assert clip.name == "clip_norm"
    # the explosion ruins the first SGD step: the second record is NaN, left to the
    # non-finite detector, and the finding comes from the last finite record
    assert math.isnan(rows[-1]["global_grad_norm"]) and finding.step == 0
    # One rule for every clip threshold (diagnose/suggest.py): the first record already
    # explodes through time, so no healthy norm precedes the first bad record and the
    # threshold is the usual 1.0. (It was the recorded norm divided by the growth's
    # amplification, a detector-specific rule that disagreed with the others.)
    assert diagnosis.suggested["first_bad_step"] == 0
    assert clip.params["max_norm"] == 1.0 == diagnosis.suggested["clip_norm"]
    trunc = next(r for r in finding.remedies if r.name == "truncate_bptt")
    assert (
        ev["per_step_gain"] ** trunc.params["steps"]
        <= 1e3
        < ev["per_step_gain"] ** (trunc.params["steps"] + 1)
    )


def test_lstm_forget_bias_three_is_healthy():
    rnn = nn.LSTM(8, 32)
    with torch.no_grad():
        rnn.bias_ih_l0[32:64] = 3.0
        rnn.bias_hh_l0[32:64] = 0.0
    _, diagnosis, rows = watched_rows(rnn, seq_len=60)
    assert in_time(diagnosis) == []
    rec = rows[-1]["recurrent"]["rnn"]
    assert np.mean(rec["forget_gate_mean"]) > 0.9  # sigmoid(3) = 0.95


def test_lstm_default_init_vanishes_and_leads_with_forget_bias():
    _, diagnosis, rows = watched_rows(nn.LSTM(8, 32), seq_len=100)
    (finding,) = in_time(diagnosis)
    assert finding.problem is Problem.VANISHING_IN_TIME
    assert finding.remedies[0].name == "forget_bias"
    # f^(T-1) >= 1e-3 needs f >= 0.933, i.e. a bias of logit(0.933) = 2.6 -> 3
    assert finding.remedies[0].params["value"] == 3.0
    f_mean = np.mean(rows[-1]["recurrent"]["rnn"]["forget_gate_mean"])
    assert finding.evidence["forget_gate_mean"] == pytest.approx(f_mean)
    assert 0.4 < f_mean < 0.6  # PyTorch's default init: sigmoid(~0)
    assert f"{f_mean:.3g}" in finding.explanation
    # the time profile for the terminal/HTML views: the latest record's dh_norm, by time step
    profile = diagnosis.context["time_profile"]["rnn"]
    assert profile == rows[-1]["recurrent"]["rnn"]["dh_norm"] and len(profile) == 100


class EveryStep(Last):
    """A head on every step's output: the loss reaches every step, as a language model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def test_default_lstm_with_a_loss_at_every_step_is_healthy():
    model = EveryStep(nn.LSTM(8, 32))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradmedic.watch(model, opt, recurrent=True) as mon:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(60, 16, 8)).pow(2).mean().backward()
            opt.step()
        diagnosis = mon.diagnose()
        rec = mon.history.rows()[-1]["recurrent"]["rnn"]
    # the last step's own gradient does die out within the sequence ...
    last = log_gain(processing_order(rec["dh_norm_last"], "l0"))
    assert last is not None and last**59 < 1e-6
    # ... but every step gets its own loss, and the forget gate (0.5) can still learn
    whole = log_gain(processing_order(rec["dh_norm"], "l0"))
    assert whole is not None and whole**59 > 1e-3
    assert 0.4 < np.mean(rec["forget_gate_mean"]) < 0.6
    assert in_time(diagnosis) == []


# ---- hand-made profiles: the thresholds' reasoning, not a fit to the models above


def row(profile, stream="l0", step=0, **extra):
    entry = {
        "kind": "rnn",
        "nonlinearity": "tanh",
        "seq_len": len(profile),
        "num_layers": 1,
        "dh_norm": list(profile),
        "sigma_max": 0.9,
        "spectral_radius": 0.8,
    }
    return {"step": step, "recurrent": {"m": {**entry, "streams": {stream: entry}}}, **extra}


def geometric(total, steps=50):
    """Profile in time order whose first step is ``total`` times the last step."""
    g = total ** (1 / (steps - 1))
    return [g ** (steps - 1 - t) for t in range(steps)]


def test_threshold_is_a_thousandfold_decay_within_the_sequence():
    assert detect_vanishing([row(geometric(2e-3))], CONFIG) == []
    (f,) = detect_vanishing([row(geometric(5e-4))], CONFIG)
    assert f.severity is Severity.WARNING
    assert f.evidence["total_gain"] == pytest.approx(5e-4, rel=1e-9)
    (f,) = detect_vanishing([row(geometric(1e-7))], CONFIG)
    assert f.severity is Severity.CRITICAL
    assert detect_exploding([row(geometric(5e2))], CONFIG) == []
    (f,) = detect_exploding([row(geometric(2e3))], CONFIG)
    assert f.severity is Severity.WARNING
    assert f.evidence["per_step_gain"] == pytest.approx(2e3 ** (1 / 49), rel=1e-9)


def test_a_doubling_per_step_explodes_however_short_the_sequence():
    # 5 steps at 2.2x per step: 23x across the sequence, far under 1e3, but the factor is
    # W_hh's: a sequence of 10 steps would pass 1e3
    (f,) = detect_exploding([row(geometric(2.2**4, steps=5))], CONFIG)
    assert f.severity is Severity.WARNING
    assert f.evidence["per_step_gain"] == pytest.approx(2.2, rel=1e-9)
    assert "passes 1e3 in a sequence of 10 steps" in f.explanation  # 2.2^9 > 1e3 > 2.2^8
    assert "truncate_bptt" not in [r.name for r in f.remedies]  # 8 steps > the 5 there are
    assert detect_exploding([row(geometric(1.9**4, steps=5))], CONFIG) == []
    assert detect_exploding([row(geometric(2.2**2, steps=3))], CONFIG) == []  # too few to fit


def test_relu_rnn_of_radius_three_and_a_half_on_five_steps_is_caught_before_training():
    torch.manual_seed(0)
    rnn = scaled_orthogonal(nn.RNN(2, 32, nonlinearity="relu", batch_first=True), 3.5)
    head = nn.Linear(32, 1)
    x, y = torch.randn(64, 5, 2), torch.randn(64, 1)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = rnn, head

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(inputs)[0][:, -1])

    (finding,) = in_time(gradmedic.check(Model(), x, y, nn.MSELoss()))
    assert finding.problem is Problem.EXPLODING_IN_TIME
    # independently: unroll the same RNN by hand and read ||dL/dh_t|| from autograd
    w_ih, w_hh, b = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    h, states = torch.zeros(64, 32), []
    for t in range(5):
        h = torch.relu(x[:, t] @ w_ih.T + h @ w_hh.T + b)
        h.retain_grad()
        states.append(h)
    nn.functional.mse_loss(head(h), y).backward()
    # the probe unrolls the first SAMPLED_SEQUENCES sequences of the batch
    norms = [float(s.grad[:SAMPLED_SEQUENCES].norm()) for s in states]
    assert finding.evidence["profile"] == pytest.approx(norms, rel=1e-5)
    gain = finding.evidence["per_step_gain"]
    assert gain == pytest.approx(fitted_gain(np.array(norms)), rel=1e-5)
    assert gain >= 2.0 and finding.evidence["total_gain"] < 1e3


def test_reverse_stream_is_read_in_its_processing_order():
    # reverse direction: processed from t = T-1 down to 0, so its last step is t = 0
    rev = geometric(1e-5)[::-1]
    (f,) = detect_vanishing([row(rev, stream="l0_reverse")], CONFIG)
    assert f.evidence["stream"] == "l0_reverse"
    assert f.evidence["total_gain"] == pytest.approx(1e-5, rel=1e-9)
    assert detect_exploding([row(rev, stream="l0_reverse")], CONFIG) == []


def test_overflow_is_critical_explosion_and_zeros_are_skipped_in_the_fit():
    prof = geometric(1e6)
    prof[0] = math.inf
    (f,) = detect_exploding([row(prof)], CONFIG)
    assert f.severity is Severity.CRITICAL and "inf" in f.explanation
    vanish = geometric(1e-30)
    vanish[:5] = [0.0] * 5  # underflow at the far end
    (f,) = detect_vanishing([row(vanish)], CONFIG)
    assert f.evidence["per_step_gain"] == pytest.approx(1e-30 ** (1 / 49), rel=1e-9)


def test_isolated_profile_is_preferred_and_json_rows_work():
    flat = [1.0] * 30  # per-step losses keep the total flat...
    r = row(flat)
    for entry in (r["recurrent"]["m"], r["recurrent"]["m"]["streams"]["l0"]):
        entry["dh_norm_last"] = geometric(1e-8, 30)  # ...while the recurrence kills the signal
    rows = json.loads(json.dumps([r]))
    (f,) = detect_vanishing(rows, CONFIG)
    assert f.evidence["profile_source"] == "dh_norm_last"
    assert time_profiles(rows) == {"m": flat}


def lstm_row(whole, forget_gate):
    """An LSTM record whose last step's gradient falls to 1e-8 over 30 steps."""
    r = row(whole)
    for entry in (r["recurrent"]["m"], r["recurrent"]["m"]["streams"]["l0"]):
        entry.update(kind="lstm", dh_norm_last=geometric(1e-8, 30))
        entry["forget_gate_mean"] = [forget_gate] * 30
    return r


def test_a_loss_at_every_step_clears_a_learnable_gate_only():
    # the loss reaches every step and the forget gate is PyTorch's 0.5: trained, not a finding
    assert detect_vanishing([lstm_row([1.0] * 30, 0.5)], CONFIG) == []
    # the same gate, a loss at the last step only: the first step's share is 1e-8
    (f,) = detect_vanishing([lstm_row(geometric(1e-8, 30), 0.5)], CONFIG)
    assert f.severity is Severity.CRITICAL and f.evidence["whole_loss_fades"] is True
    assert "still open" in f.explanation and "forget bias below" in f.explanation
    # a gate shut at 0.02 (forget bias -4): critical, whether or not every step has a loss
    for whole in ([1.0] * 30, geometric(1e-8, 30)):
        (f,) = detect_vanishing([lstm_row(whole, 0.02)], CONFIG)
        assert f.severity is Severity.CRITICAL and f.remedies[0].name == "forget_bias"


def test_window_averages_geometrically():
    rows = [row(geometric(1e-2), step=0), row(geometric(1e-6), step=1)]
    (f,) = detect_vanishing(rows, CONFIG)
    assert f.evidence["total_gain"] == pytest.approx(1e-4, rel=1e-9)
    assert f.step == 1


def test_helpers():
    assert log_gain([8.0, 4.0, 2.0, 1.0]) == pytest.approx(0.5)
    assert log_gain([1.0, 0.0]) is None
    assert horizon([1.0, 0.5, 1e-4], 1e-3) == 2
    assert horizon([1.0, 0.5], 1e-3) is None
    assert processing_order([1, 2, 3], "l0") == [3, 2, 1]
    assert processing_order([1, 2, 3], "l1_reverse") == [1, 2, 3]
    f = forget_bias_for(60, 1e-3)
    assert (1 / (1 + math.exp(-f))) ** 59 >= 1e-3 > (1 / (1 + math.exp(-(f - 0.5)))) ** 59
