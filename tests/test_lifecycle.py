"""The monitor's lifecycle, its sink, and probes that meet a diverged model."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.history import load_history


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def backward(model: nn.Module) -> None:
    model(torch.randn(3, 4)).pow(2).mean().backward()


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_step_after_close_is_ignored_with_one_clear_warning(with_optimizer: bool) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if with_optimizer else None
    mon = gradmedic.watch(model, opt)
    backward(model)
    opt.step() if opt else mon.step()
    mon.close()
    assert mon.closed and len(mon.history) == 1
    with pytest.warns(RuntimeWarning, match=r"after close\(\) was ignored"):
        for _ in range(3):
            backward(model)
            mon.step()
            if opt:
                opt.step()
    assert len(mon.history) == 1  # nothing appended after close
    assert mon.diagnose().layers == ["0", "2"]  # the history stays readable
    mon.close()  # twice is fine


def test_sink_appends_a_new_run_and_says_so(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    model = mlp()
    with gradmedic.watch(model, sink=path) as mon:
        backward(model)
        mon.step()
    with pytest.warns(UserWarning, match="already holds 1 run"):
        second = gradmedic.watch(model, sink=path)
    with second:
        for _ in range(2):
            backward(model)
            second.step()
    headers = [json.loads(line) for line in path.read_text().splitlines()]
    assert [h["run"] for h in headers if "gradmedic" in h] == [0, 1]
    _, first_rows = load_history(path, run=0)
    _, last_rows = load_history(path)
    assert len(first_rows) == 1 and len(last_rows) == 2


def test_probes_keep_recording_through_a_divergence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 300), nn.Tanh(), nn.Linear(300, 1))
    rnn = nn.RNN(4, 8, batch_first=True)
    opt = torch.optim.SGD([*model.parameters(), *rnn.parameters()], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no probe may switch itself off
        with (
            gradmedic.watch(model, opt, spectra=True, update_every=1, activations=True) as mon,
            gradmedic.watch(rnn, recurrent=True, spectra=True, update_every=1) as rmon,
        ):
            for step in range(3):
                if step == 1:
                    with torch.no_grad():
                        model[0].weight[0, 0] = float("nan")
                        rnn.weight_hh_l0[0, 0] = float("nan")
                opt.zero_grad()
                model(torch.randn(5, 4)).pow(2).mean().backward()
                rnn(torch.randn(2, 6, 4))[0].pow(2).mean().backward()
                rmon.step()
                opt.step()
    rows = mon.history.rows()
    assert len(rows) == 3 and not mon.disabled and not rmon.disabled
    assert math.isfinite(rows[0]["weight_sigma_max"]["0"])
    assert math.isnan(rows[1]["weight_sigma_max"]["0"])
    assert math.isfinite(rows[1]["weight_sigma_max"]["2"])  # the healthy layer is measured
    assert mon.diagnose().has("nonfinite")
    rrows = rmon.history.rows()
    assert len(rrows) == 3 and "recurrent" in rrows[0]
