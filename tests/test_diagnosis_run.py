"""Diagnosis over a whole run, on labelled row lists: each setup with its healthy twin.

Every number a finding reports is recomputed here from the rows, independently of
the detectors (plain numpy on the row values), so a finding can always be traced
back to what was recorded.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from gradmedic.diagnose import DiagnosisConfig, diagnose_rows
from gradmedic.findings import Problem, Severity

CONFIG = DiagnosisConfig()


def geometric(n: int, gain: float, last: float = 1.0) -> dict[str, float]:
    """Delta norms of n layers, each going back multiplying by ``gain``."""
    return {f"fc{i}": last * gain ** (n - 1 - i) for i in range(n)}


def flat(n: int, wobble: float = 0.3, seed: int = 0) -> dict[str, float]:
    """A non-geometric profile: each layer within ``10**±wobble`` of 1."""
    rng = np.random.default_rng(seed)
    return {f"fc{i}": float(10 ** rng.uniform(-wobble, wobble)) for i in range(n)}


def healthy_row(step: int, **extra) -> dict:
    return {
        "step": step,
        "delta_norm": flat(10, seed=step),
        "grad_norm": flat(10, seed=100 + step),
        "global_grad_norm": 1.0 + 0.1 * step,
        "update_ratio": {f"fc{i}": 2e-3 for i in range(10)},
        "param_norm": {f"fc{i}": 5.0 for i in range(10)},
        "loss": 2.3 - 0.01 * step,
        "nonfinite_origin": None,
        **extra,
    }


def nan_row(step: int) -> dict:
    nan = float("nan")
    return {
        "step": step,
        "delta_norm": {f"fc{i}": nan for i in range(10)},
        "grad_norm": {f"fc{i}": nan for i in range(10)},
        "global_grad_norm": nan,
        "update_ratio": {f"fc{i}": nan for i in range(10)},
        "param_norm": {f"fc{i}": nan for i in range(10)},
        "loss": nan,
        "nonfinite_origin": {"layer": "fc0", "where": "forward", "step": step},
    }


def exploded_then_nan() -> list[dict]:
    """Five healthy steps, an explosion through depth at step 5, NaN from step 6."""
    rows = [healthy_row(s) for s in range(5)]
    boom = healthy_row(5)
    boom.update(
        delta_norm=geometric(10, 11.3),
        grad_norm={f"fc{i}": 3e4 for i in range(10)},
        global_grad_norm=1e5,
        update_ratio={f"fc{i}": 40.0 for i in range(10)},
        loss=45.0,
    )
    return [*rows, boom, *(nan_row(s) for s in range(6, 9))]


# ---- an explosion that turns into NaN: the explosion is named, first, with its step


def test_explosion_then_nan_is_a_chain_with_the_explosion_first():
    rows = exploded_then_nan()
    d = diagnose_rows(rows)
    assert d.chain[0].problem is Problem.EXPLODING
    assert d.chain[0].step == 5 and d.chain[-1].problem is Problem.NONFINITE
    assert d.chain[-1].step == 6
    root = d.findings[0]
    assert root.problem is Problem.EXPLODING and d.root_cause is root
    assert root.severity is Severity.CRITICAL  # peak 11.3^9 = 3e9 > 1e6
    assert root.remedies[0].name == "he_init"  # init is named
    nonfinite = d.by_problem("nonfinite")[0]
    assert nonfinite.cause is Problem.EXPLODING
    # the episode: onset 5, peak 5, no finite record after it to recover on
    assert (root.episode.onset, root.episode.peak, root.episode.recovery) == (5, 5, None)
    assert root.evidence["peak_total_gain"] == pytest.approx(11.3**9)


def test_the_healthy_twin_of_the_explosion_is_healthy():
    d = diagnose_rows([healthy_row(s) for s in range(9)])
    assert d.healthy and d.status == "healthy" and d.findings == []


def test_one_clip_threshold_and_a_bounded_lr_factor_from_the_records_before_the_first_bad():
    rows = exploded_then_nan()
    d = diagnose_rows(rows)
    clips = {r.params["max_norm"] for f in d.findings for r in f.remedies if r.name == "clip_norm"}
    # independently: the 90th percentile of the global norms of steps 0-4 (before step 5)
    before = [r["global_grad_norm"] for r in rows[:5]]
    want = float(np.percentile(before, 90))
    assert len(clips) == 1 and clips.pop() == pytest.approx(want)
    assert d.suggested["clip_norm"] == pytest.approx(want)
    assert d.suggested["first_bad_step"] == 5
    factors = {r.params["factor"] for f in d.findings for r in f.remedies if r.name == "lower_lr"}
    assert len(factors) == 1
    (factor,) = factors
    assert 0.01 <= factor <= 0.5
    # the pre-bad update ratios are healthy (2e-3); the first bad record's 40 sizes the
    # factor: 1e-2 / 40 = 2.5e-4, a power of ten, bounded to 0.01 (not "1e+16x")
    assert factor == 0.01
    assert d.suggested["update_ratio"] == 40.0


def test_clip_without_any_finite_record_before_the_first_bad_is_the_usual_one():
    rows = exploded_then_nan()[5:]
    d = diagnose_rows(rows)
    assert d.suggested["clip_norm"] == 1.0 and d.suggested["baseline_steps"] is None
    for f in d.findings:
        for r in f.remedies:
            if r.name == "clip_norm":
                assert r.params["max_norm"] == 1.0


def test_a_run_that_already_clips_is_not_told_to_clip():
    rows = [healthy_row(s, global_grad_norm=0.25) for s in range(5)]  # capped: always 0.25
    rows += [healthy_row(s, loss=v, update_ratio={"fc0": 0.8}, global_grad_norm=0.25)
             for s, v in zip(range(5, 9), [9.0, 34.0, 110.0, 150.0], strict=True)]  # fmt: skip
    d = diagnose_rows(rows)
    assert d.suggested["existing_clip"] == pytest.approx(0.25)
    assert d.suggested["clip_norm"] is None
    assert not any(r.name == "clip_norm" for f in d.findings for r in f.remedies)
    assert "already clipped at 0.25" in d.by_problem("divergence")[0].explanation


# ---- the transformer LM diverging at a too-large lr: divergence, not vanishing


def lm_rows(losses, ratio: float, grad_only: bool = False) -> list[dict]:
    """Records of a residual + LayerNorm LM: an embedding with a tiny gradient, a flat rest."""
    rows = []
    for s, loss in enumerate(losses):
        prof = {"emb": 1e-12, **{f"block{i}": float(10 ** (0.2 * math.sin(s + i)))
                                  for i in range(12)}, "head": 1.0}  # fmt: skip
        row = {"step": s, "grad_norm": prof, "loss": loss, "global_grad_norm": 0.25,
               "update_ratio": {"block0": ratio, "head": ratio / 2}}  # fmt: skip
        if not grad_only:
            row["delta_norm"] = dict(prof)
        rows.append(row)
    return rows


LM_CONTEXT = {
    "optimizer": None,  # manual SGD: p -= lr * p.grad
    "structure": {"normalization": ["ln"], "residual": ["block0"], "gated": [], "recurrent": []},
}


def test_lm_diverging_is_a_too_large_step_and_not_vanishing():
    rows = lm_rows([9.0, 9.1, 8.9, 34.0, 110.0, 120.0, 115.0], ratio=0.6, grad_only=True)
    d = diagnose_rows(rows, context=LM_CONTEXT)
    assert d.problems == {Problem.DIVERGENCE, Problem.UNSTABLE_UPDATES}
    f = d.by_problem("divergence")[0]
    # the fit alone would cross 1e-3 (the embedding): only a geometric profile is vanishing
    assert diagnose_rows(rows, DiagnosisConfig(geometric_r2=0.0)).has("vanishing")
    assert f.evidence["depth_r2"] < CONFIG.geometric_r2
    # independently: the smoothed loss (median of 3) and its low so far
    smoothed = [statistics.median([r["loss"] for r in rows[max(0, i - 2) : i + 1]])
                for i in range(len(rows))]  # fmt: skip
    onset = next(i for i in range(1, len(rows)) if smoothed[i] >= 3 * min(smoothed[:i]))
    assert f.episode.onset == rows[onset]["step"] == f.evidence["onset_step"]
    assert f.evidence["loss_ratio"] == pytest.approx(smoothed[onset] / min(smoothed[:onset]))
    assert f.evidence["low"] == min(smoothed[:onset])
    assert f.evidence["peak_loss"] == max(r["loss"] for r in rows)
    assert f.evidence["max_update_ratio"] == 0.6
    # remedies fit the setup: a manual loop (no param_groups), no clip (already clipped),
    # no normalization or residual advice for a model that has both
    calls = [r.call for x in d.findings for r in x.remedies]
    assert not any("param_groups" in c for c in calls)
    assert f.remedies[0].name == "lower_lr" and f.remedies[0].call.startswith("lr = lr * ")
    assert f.remedies[0].params["factor"] == d.suggested["lr_factor"] == 0.01  # 1e-2/0.6
    names = {r.name for x in d.findings for r in x.remedies}
    assert not names & {"batch_norm", "layer_norm", "residual", "clip_norm"}
    assert "warmup" in names  # diverged at step 3: early


def test_lm_at_a_sane_lr_is_healthy():
    rows = lm_rows([9.0, 8.7, 8.5, 8.2, 8.3, 7.9, 7.6], ratio=5e-3)
    assert diagnose_rows(rows, context=LM_CONTEXT).healthy


def test_a_loss_that_rises_while_every_step_is_small_is_not_a_step_size_divergence():
    rows = lm_rows([9.0, 9.1, 8.9, 34.0, 110.0, 120.0, 115.0], ratio=1e-3)
    assert not diagnose_rows(rows).has("divergence")


def test_noise_near_a_low_loss_is_not_a_divergence():
    losses = [2.3, 1.0, 0.3, 0.05, 0.01, 0.03, 0.02, 0.04, 0.03]  # 3x over 0.01, but tiny
    rows = [{"step": s, "loss": v, "update_ratio": {"a": 0.05}} for s, v in enumerate(losses)]
    assert not diagnose_rows(rows).has("divergence")
    back = [*losses, 2.0, 2.4, 2.6]  # climbing back to where it started is one
    rows = [{"step": s, "loss": v, "update_ratio": {"a": 0.05}} for s, v in enumerate(back)]
    assert diagnose_rows(rows).has("divergence")


# ---- zero-initialized parameters: the update ratio is undefined there, not huge


def lora_rows(steps: int = 8) -> list[dict]:
    """A LoRA layer pair under Adam: B starts at 0, then grows by ~lr per step."""
    rows = []
    for s in range(steps):
        b_norm = 0.016 * s
        rows.append({
            "step": s,
            "param_norm": {"lora_A": 1.1, "lora_B": b_norm},
            "update_norm": {"lora_A": 0.01, "lora_B": 0.016},
            "update_ratio": {"lora_A": 0.01 / 1.1, "lora_B": 0.016 / max(b_norm, 1e-30)},
            "loss": 2.35 - 0.001 * s,
        })  # fmt: skip
    return rows


def test_zero_initialized_layers_are_not_unstable():
    rows = lora_rows()
    assert rows[0]["update_ratio"]["lora_B"] > 1e25
    d = diagnose_rows(rows)
    assert not d.has("unstable_updates")
    assert d.healthy
    assert any("lora_B (step 0)" in note for note in d.coverage.notes)


def test_the_same_ratios_on_a_layer_with_weights_are_unstable():
    rows = lora_rows()
    for r in rows:
        r["param_norm"]["lora_B"] = 0.016  # a layer whose norm is its own, not grown from 0
        r["update_ratio"]["lora_B"] = 1.0
    d = diagnose_rows(rows)
    (f,) = d.by_problem("unstable_updates")
    assert f.severity is Severity.CRITICAL and f.layers == ["lora_B"]
    assert f.remedies[0].params["factor"] == 0.01  # 1e-2 / 1.0 = 1e-2: in bounds


# ---- explosion through time: the peak is one record's growth, not the window's average


def rnn_row(step: int, total: float, steps: int = 40) -> dict:
    g = total ** (1 / (steps - 1))
    prof = [g ** (steps - 1 - t) for t in range(steps)]
    entry = {"kind": "rnn", "nonlinearity": "tanh", "seq_len": steps, "num_layers": 1,
             "dh_norm": prof, "sigma_max": 1.5, "spectral_radius": 1.4}  # fmt: skip
    return {"step": step, "recurrent": {"rnn": {**entry, "streams": {"l0": entry}}},
            "global_grad_norm": 1.0}  # fmt: skip


def test_exploding_in_time_severity_comes_from_the_worst_record():
    rows = [rnn_row(s, 1.0) for s in range(4)] + [rnn_row(4, 3.5e29)]
    d = diagnose_rows(rows)
    (f,) = d.by_problem("exploding_in_time")
    # the window's geometric mean is (3.5e29)^(1/5) = 1.3e6; the record itself 3.5e29
    assert f.evidence["total_gain"] == pytest.approx(3.5e29 ** (1 / 5), rel=1e-6)
    assert f.evidence["peak_growth"] == pytest.approx(3.5e29, rel=1e-6)
    assert f.severity is Severity.CRITICAL and f.episode.peak == 4


def test_exploding_in_time_twin_is_healthy():
    assert diagnose_rows([rnn_row(s, 1.0) for s in range(5)]).healthy


# ---- episodes


def test_episode_onset_peak_and_recovery_are_the_rows():
    gains = [1.0, 1.0, 0.2, 0.1, 0.15, 1.0, 1.0]
    rows = [{"step": 10 * s, "delta_norm": geometric(10, g)} for s, g in enumerate(gains)]
    (f,) = diagnose_rows(rows, DiagnosisConfig(window=1)).findings
    bad = [r["step"] for r, g in zip(rows, gains, strict=True) if g**9 < 1e-3]
    assert f.episode.onset == bad[0] == 20 and f.episode.last == bad[-1] == 40
    assert f.episode.peak == 30 and f.episode.peak_value == pytest.approx(0.1**9)
    assert f.episode.recovery == 50 and f.episode.records == 3
    assert f.severity is Severity.CRITICAL  # the peak, 1e-9; the last bad record was 4e-8
    assert "gone at step 50" in f.explanation


def test_a_problem_seen_only_in_the_middle_of_the_run_is_reported():
    gains = [1.0] * 3 + [0.1] * 6 + [1.0] * 6
    rows = [{"step": s, "delta_norm": geometric(10, g)} for s, g in enumerate(gains)]
    d = diagnose_rows(rows)  # the last window (5 records) is healthy
    (f,) = d.findings
    assert f.problem is Problem.VANISHING and f.episode.recovery is not None


# ---- nothing recorded, and what was not checked


def test_nothing_recorded_is_not_healthy_and_says_why():
    d = diagnose_rows([])
    assert not d.healthy and d.status == "no_records" and d.coverage.steps == 0
    assert "monitor.step" in d.warnings[0]
    d = diagnose_rows([], context={"optimizer": None, "monitor": {"optimizer": False}})
    assert "no optimizer" in d.warnings[0]
    d = diagnose_rows([{"step": 0}], layers=[])
    assert d.status == "nothing_checked" and "no parameter" in d.warnings[0]
    d = diagnose_rows([{"step": 0, "skipped": True}])
    assert d.status == "no_records" and "skipped" in d.warnings[0]
    assert d.to_dict()["status"] == "no_records" and d.to_dict()["healthy"] is False


def test_coverage_counts_keys_and_names_what_was_not_checked():
    rows = [healthy_row(s) for s in range(4)]
    rows[0]["activations"] = {"act": {"kind": "ReLU", "units": 8, "dead_fraction": 0.0}}
    d = diagnose_rows(rows)
    cov = d.coverage
    assert cov.steps == 4 and (cov.first_step, cov.last_step) == (0, 3)
    assert cov.keys["grad_norm"] == 4 and cov.keys["activations"] == 1
    assert "recurrent" not in cov.keys
    assert set(cov.not_checked) == {"vanishing_in_time", "exploding_in_time"}
    d = diagnose_rows([healthy_row(0)])
    assert "no `activations` key" in d.coverage.not_checked["dead_units"]
    assert "saturation" in d.coverage.not_checked
    no_rnn = diagnose_rows([healthy_row(0)], context={"structure": {"recurrent": []}})
    assert "vanishing_in_time" not in no_rnn.coverage.not_checked  # nothing to check


# ---- remedies that fit the setup


def test_remedies_know_the_optimizer_and_what_the_model_has():
    rows = [{"step": 0, "delta_norm": geometric(10, 0.2)}]
    plain = {r.name for r in diagnose_rows(rows).findings[0].remedies}
    assert {"batch_norm", "residual"} <= plain  # nothing known: every cure stays
    has = {"structure": {"normalization": ["bn"], "residual": ["block"]}}
    names = {r.name for r in diagnose_rows(rows, context=has).findings[0].remedies}
    assert not names & {"batch_norm", "residual"} and "he_init" in names
    spike = [{"step": 0, "update_ratio": {"a": 2.0}, "lr": [1e-3]}]
    adamw = {"optimizer": {"type": "AdamW", "lr": [1e-3], "adaptive": True}}
    names = [r.name for r in diagnose_rows(spike, context=adamw).findings[0].remedies]
    assert "adaptive_optimizer" not in names
    sgd = {"optimizer": {"type": "SGD", "lr": [0.1], "adaptive": False}}
    (f,) = diagnose_rows(spike, context=sgd).findings
    adam = next(r for r in f.remedies if r.name == "adaptive_optimizer")
    assert "instead of SGD" in adam.description
    manual = diagnose_rows(spike, context={"optimizer": None}).findings[0].remedies
    assert manual[0].call.startswith("lr = lr * ") and "param_groups" not in manual[0].call
    # the concrete new lr: 1e-3 * 0.01 (1e-2 / 2 is 5e-3, a power of ten 1e-3, bounded to 0.01)
    assert "(to 1e-05)" in f.remedies[0].description


def test_surgery_remedies_rebind_the_model():
    rows = [{"step": 0, "delta_norm": geometric(10, 0.2)}]
    context = {"activations": {f"fc{i}": "Sigmoid" for i in range(10)}}
    for r in diagnose_rows(rows, context=context).findings[0].remedies:
        if "surgery" in r.call:
            assert r.call.startswith("model = gradmedic.surgery.")


def test_every_finding_serializes_its_episode():
    d = diagnose_rows(exploded_then_nan())
    data = d.to_dict()
    head = {"problem": "exploding", "step": 5, "layers": list(d.chain[0].layers)}
    assert data["chain"][0] == head
    assert all(f["episode"]["onset"] is not None for f in data["findings"])
    assert data["coverage"]["steps"] == 9


def test_every_number_of_the_chain_is_recomputed_from_the_rows():
    rows = exploded_then_nan()
    d = diagnose_rows(rows)
    exploding, unstable = d.by_problem("exploding")[0], d.by_problem("unstable_updates")[0]
    # exploding: the window ending at step 5 averages 11.3^9 with four flat records down to
    # 11.3^(9/5) = 78, inside 1e3; step 5 counts alone (the last usable record, and beyond
    # 1e6), so the evidence is that record's own fit
    window = np.array(
        [[math.log10(r["delta_norm"][f"fc{i}"]) for i in range(10)] for r in rows[1:6]]
    ).mean(axis=0)
    assert 10 ** (-9 * np.polyfit(np.arange(10), window, 1)[0]) < 1e3
    logs = np.array([math.log10(rows[5]["delta_norm"][f"fc{i}"]) for i in range(10)])
    slope, intercept = np.polyfit(np.arange(10), logs, 1)
    assert exploding.evidence["per_layer_gain"] == pytest.approx(10**-slope)
    assert exploding.evidence["total_gain"] == pytest.approx(10 ** (-9 * slope))
    resid = logs - (slope * np.arange(10) + intercept)
    r2 = 1 - np.sum(resid**2) / np.sum((logs - logs.mean()) ** 2)
    assert exploding.evidence["fit_r2"] == pytest.approx(r2)
    assert exploding.evidence["peak_total_gain"] == pytest.approx(11.3**9)
    first = rows[5]["delta_norm"]
    assert exploding.evidence["input_output_ratio"] == pytest.approx(first["fc0"] / first["fc9"])
    assert exploding.step == 5
    # unstable_updates: the first record whose largest ratio is >= 1 (step 5, 40.0)
    onset = next(r for r in rows if max(r["update_ratio"].values()) >= 1)
    assert unstable.step == onset["step"] == unstable.episode.onset
    assert unstable.evidence["update_ratio"] == max(onset["update_ratio"].values())
    # The NaN records' ratios follow from their NaN gradients: not step sizes, left out.
    assert unstable.episode.peak_value == 40.0
    # nonfinite: the first record with an origin
    nonfinite = d.by_problem("nonfinite")[0]
    first_nan = next(r for r in rows if r["nonfinite_origin"])
    assert nonfinite.step == first_nan["step"] and nonfinite.evidence["layer"] == "fc0"
    assert nonfinite.episode.records == sum(1 for r in rows if r["nonfinite_origin"])


def test_an_explosion_through_time_right_before_nan_is_named_first():
    nan_entry = rnn_row(5, 1.0)
    nan_entry["recurrent"]["rnn"]["dh_norm"][0] = float("nan")
    nan_entry.update(global_grad_norm=float("nan"), loss=float("nan"))
    rows = [rnn_row(s, 1.0) for s in range(4)] + [rnn_row(4, 1e5), nan_entry]
    d = diagnose_rows(rows)
    assert [link.problem for link in d.chain] == [Problem.EXPLODING_IN_TIME, Problem.NONFINITE]
    (f,) = d.by_problem("exploding_in_time")
    assert f.episode.onset == 4 and f.evidence["end_ratio"] == pytest.approx(1e5, rel=1e-6)
    # its window alone, (1e5)^(1/5) = 10, would not have crossed 1e3
    assert not diagnose_rows(rows[:5]).has("exploding_in_time")
