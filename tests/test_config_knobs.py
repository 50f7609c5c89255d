"""Diagnosis knobs that act on what was recorded: changing them changes the verdict."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.diagnose import DiagnosisConfig, diagnose_rows
from gradmedic.diagnose.units import fraction_at
from gradmedic.probes.activations import SLOPE_GRID


def _tanh_run(std: float) -> tuple[list[dict], torch.Tensor]:
    """One recorded step of Linear -> Tanh whose pre-activations have spread ``std``."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 256)
    with torch.no_grad():
        lin.weight.normal_(0.0, std / 32**0.5)
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(256, 1))
    x = torch.randn(512, 32)
    with gradmedic.watch(model, activations=1) as mon:
        model(x).pow(2).mean().backward()
        mon.step()
    with torch.no_grad():
        pre = lin(x)
    return list(mon.history.rows()), pre


def test_saturated_by_slope_equals_the_fraction_computed_from_the_pre_activations() -> None:
    rows, pre = _tanh_run(2.5)
    entry = rows[0]["activations"]["1"]
    slope = 1 - torch.tanh(pre).square()  # tanh' = 1 - tanh^2, max 1
    expected = [float((slope < s).double().mean()) for s in SLOPE_GRID]
    assert entry["saturated_by_slope"] == pytest.approx(expected, abs=1e-9)
    assert entry["saturated_fraction"] == pytest.approx(expected[SLOPE_GRID.index(0.05)], abs=1e-9)
    # between two rules: linear in log slope
    mid = fraction_at(entry, (0.05 * 0.1) ** 0.5)
    assert mid == pytest.approx((expected[2] + expected[3]) / 2, abs=1e-9)


def test_saturation_slope_changes_the_verdict() -> None:
    rows, pre = _tanh_run(2.5)
    slope = 1 - torch.tanh(pre).square()
    assert float((slope < 0.05).double().mean()) < 0.5 < float((slope < 0.2).double().mean())
    strict = diagnose_rows(rows)  # the 5% rule: under half saturated
    loose = diagnose_rows(rows, DiagnosisConfig(saturation_slope=0.2))
    assert "saturation" not in {f.problem.value for f in strict.findings}
    found = [f for f in loose.findings if f.problem.value == "saturation"]
    assert found and found[0].evidence["slope_rule"] == 0.2


# ---- every field of DiagnosisConfig has an effect ------------------------------------

LAYERS = [str(i) for i in range(5)]


def _geometric(total: float) -> dict[str, float]:
    """Deltas of 5 layers falling (or growing) geometrically to ``total`` at the input side."""
    return {str(i): total ** ((4 - i) / 4) for i in range(5)}


def _activation(kind: str, dead: float = 0.0, by_slope: list[float] | None = None) -> dict:
    entry: dict = {"kind": kind, "units": 100, "dead_fraction": dead}
    if by_slope is not None:  # the fractions under the rules 1%, 2%, 5%, 10%, 20% of max phi'
        entry.update(saturated_fraction=by_slope[2], saturated_by_slope=by_slope)
    return entry


def _ratios(value: float, n: int) -> list[dict]:
    return [{"step": i, "update_ratio": {"0": value}, "global_grad_norm": 1.0} for i in range(n)]


def _losses(values: list[float]) -> list[dict]:
    return [{"step": i, "loss": v, "global_grad_norm": 1.0} for i, v in enumerate(values)]


def _norms(values: list[float]) -> list[dict]:
    return [{"step": i, "global_grad_norm": v} for i, v in enumerate(values)]


def _slow(losses: list[float]) -> list[dict]:
    """SGD at lr 0.01 moving every weight by 1e-5 of its norm per step."""
    return [
        {"step": i, "loss": v, "update_ratio": {"0": 1e-5}, "lr": [0.01], "global_grad_norm": 1.0}
        for i, v in enumerate(losses)
    ]


def _in_time(gain: float, steps: int) -> list[dict]:
    """One record of a plain RNN whose ``||dL/dh_t||`` grows ``gain`` per step back."""
    entry = {
        "kind": "rnn", "nonlinearity": "relu", "seq_len": steps, "num_layers": 1,
        "dh_norm": [gain ** (steps - 1 - t) for t in range(steps)],
        "sigma_max": 3.0, "spectral_radius": 3.0,
    }  # fmt: skip
    return [{"recurrent": {"rnn": {**entry, "streams": {"l0": entry}}}}]


def problems(d) -> list[tuple[str, str]]:
    return sorted((f.problem.value, f.severity.value) for f in d.findings)


def suggested(key: str):
    return lambda d: d.suggested[key]


def raise_factor(d) -> float:
    (f,) = d.by_problem("small_steps")
    return next(r.params["factor"] for r in f.remedies if r.name == "raise_lr")


def vanishing_remedies(d) -> list[str]:
    return [r.name for r in d.by_problem("vanishing")[0].remedies]


# fmt: off
V, X, DEAD, SAT, U, DIV, SMALL, EIT = (
    "vanishing", "exploding", "dead_units", "saturation", "unstable_updates", "divergence",
    "small_steps", "exploding_in_time",
)
W, C = "warning", "critical"
SAT_BY_SLOPE = [0.1, 0.2, 0.6, 0.7, 0.8]
#: field -> (rows, the field's new value, what to read, read at the default, read at the new value)
CASES: dict[str, tuple] = {
    # total gain 1e-4 through 5 layers: below 1e-3, above 1e-5
    "vanishing_gain": ([{"delta_norm": _geometric(1e-4)}], 1e-5, problems, [(V, W)], []),
    "exploding_gain": ([{"delta_norm": _geometric(1e4)}], 1e5, problems, [(X, W)], []),
    # 4 decades: critical from 3 decades, a warning below the default 6
    "severe_gain_decades": ([{"delta_norm": _geometric(1e-4)}], 3.0, problems, [(V, W)], [(V, C)]),
    # log10 deltas -6, 0, 0, -2, 0 against depth: slope 1 decade a layer (total 1e-4), but
    # the line explains only R^2 = 100 / (10 * 27.2) = 0.37 of their variance
    "geometric_r2": (
        [{"delta_norm": {"0": 1e-6, "1": 1.0, "2": 1.0, "3": 1e-2, "4": 1.0}}],
        0.0, problems, [], [(V, W)],
    ),
    # four healthy records, then one at 1e-5: the 5-record window's mean gain is 1e-1
    "window": (
        [{"step": i, "delta_norm": _geometric(1.0)} for i in range(4)]
        + [{"step": 4, "delta_norm": _geometric(1e-5)}],
        1, problems, [], [(V, W)],
    ),
    "dead_fraction": (
        [{"activations": {"1": _activation("ReLU", dead=0.8)}}], 0.9, problems, [(DEAD, W)], []
    ),
    "dead_critical": (
        [{"activations": {"1": _activation("ReLU", dead=0.8)}}], 0.75, problems,
        [(DEAD, W)], [(DEAD, C)],
    ),
    "saturation_fraction": (
        [{"activations": {"1": _activation("Sigmoid", by_slope=SAT_BY_SLOPE)}}], 0.65, problems,
        [(SAT, W)], [],
    ),
    "saturation_critical": (
        [{"activations": {"1": _activation("Sigmoid", by_slope=SAT_BY_SLOPE)}}], 0.55, problems,
        [(SAT, W)], [(SAT, C)],
    ),
    # the 2% rule: 0.2 saturated, under the 0.5 needed
    "saturation_slope": (
        [{"activations": {"1": _activation("Sigmoid", by_slope=SAT_BY_SLOPE)}}], 0.02, problems,
        [(SAT, W)], [],
    ),
    "update_ratio_spike": (_ratios(0.5, 1), 0.4, problems, [], [(U, C)]),
    "update_ratio_sustained": (_ratios(0.2, 5), 0.1, problems, [], [(U, W)]),
    # two records: fewer than min(5, 3), enough for min(2, 3)
    "update_window": (_ratios(0.5, 2), 2, problems, [], [(U, W)]),
    # ratio 0.5 -> 1e-2 is 50x: the power of ten 0.01; -> 0.1 is 5x: 0.1 (at least 10x)
    "update_ratio_healthy": (_ratios(0.5, 5), 0.1, suggested("lr_factor"), 0.01, 0.1),
    "lr_factor_bounds": (_ratios(0.5, 5), (0.05, 0.5), suggested("lr_factor"), 0.01, 0.05),
    # smoothed loss 0.5 -> 2.0: a 4x rise
    "loss_rise": (_losses([2.0, 1.0, 0.5, 0.5, 0.5, 2.0, 2.0, 2.0]), 5.0, problems, [(DIV, W)], []),
    # 0.01 -> 0.04 is 4x, but undoes 0.03 / 0.99 = 3% of the progress from 1.0
    "loss_undo": (_losses([1.0] * 3 + [0.01] * 3 + [0.04] * 3), 0.01, problems, [], [(DIV, W)]),
    # one batch at 5x: the median of 3 hides it, a window of 1 does not
    "loss_window": (_losses([1.0] * 4 + [5.0] + [1.0] * 3), 1, problems, [], [(DIV, W)]),
    # 50x the median of the norms before it: a blow-up from 20x, not at 100x
    "blowup": (_norms([1.0] * 4 + [50.0]), 20.0, suggested("first_bad_step"), None, 4),
    # norms 1..10: numpy's linear percentile is 9.1 at 90, 5.5 at 50
    "clip_percentile": (_norms([float(v) for v in range(1, 11)]), 50.0, suggested("clip_norm"),
                        9.1, 5.5),
    # ... and 9.1 clamped to 1.2 x the median 5.5
    "clip_bounds": (
        _norms([float(v) for v in range(1, 11)]), (1e-3, 1.2), suggested("clip_norm"), 9.1, 6.6
    ),
    # nothing finite before the first (non-finite) record
    "clip_fallback": (_norms([math.nan]), 0.25, suggested("clip_norm"), 1.0, 0.25),
    "update_ratio_small": (_slow([1.0] * 20), 1e-6, problems, [(SMALL, W)], []),
    # the loss fell 15%: not "by 10% or less", but by 20% or less
    "small_steps_loss": (_slow([1.0] * 10 + [0.85] * 10), 0.8, problems, [], [(SMALL, W)]),
    # 1e-5 -> 1e-2 is 1000x: capped at the bounds' top
    "lr_raise_bounds": (_slow([1.0] * 20), (3.0, 5.0), raise_factor, 100.0, 5.0),
    # a recurrent gradient growing 2.2x per step over 5 steps: exploding at 2x, not at 3x
    "exploding_step_gain": (_in_time(2.2, 5), 3.0, problems, [(EIT, W)], []),
    # knowing that a Sigmoid follows each layer adds its swap to the vanishing cures
    "context": (
        [{"delta_norm": _geometric(1e-4)}],
        {"activations": dict.fromkeys(LAYERS, "Sigmoid")},
        lambda d: "swap_relu" in vanishing_remedies(d), False, True,
    ),
}
# fmt: on


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DiagnosisConfig)])
def test_every_knob_changes_the_diagnosis(name: str) -> None:
    assert name in CASES, (
        f"DiagnosisConfig.{name} has no case in CASES: add records on which changing it "
        "changes the diagnosis"
    )
    rows, value, read, at_default, at_value = CASES[name]
    rows = [{"step": i, **row} for i, row in enumerate(rows)]
    default = diagnose_rows(rows, layers=LAYERS)
    changed = diagnose_rows(rows, DiagnosisConfig(**{name: value}), layers=LAYERS)
    assert _close(read(default), at_default)
    assert _close(read(changed), at_value)


def _close(got, want) -> bool:
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-12)
    return got == want
