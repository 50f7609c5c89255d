from __future__ import annotations

import io
import json
import math

from rich.console import Console

from gradmedic.diagnose import diagnose_rows
from gradmedic.findings import Diagnosis
from gradmedic.report.terminal import BAR_WIDTH, MAX_ROWS, bar, render_diagnosis


def text(renderable) -> str:
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_bar_length_is_log_scaled():
    # log10(1e-3) = -3 sits a quarter of the way from -4 to 0
    assert len(bar(1e-3, -4.0, 0.0)) == BAR_WIDTH // 4
    assert len(bar(1.0, -4.0, 0.0)) == BAR_WIDTH
    assert len(bar(1e-4, -4.0, 0.0)) == 1  # never empty for a positive value
    assert bar(math.inf, -4.0, 0.0) == "!" * BAR_WIDTH
    assert bar(0.0, -4.0, 0.0) == "·"
    assert bar(None, 0.0, 1.0) == ""


def test_healthy_view():
    out = text(Diagnosis(layers=["a", "b"], profile={"grad_norm": {"a": 0.1, "b": 1.0}}))
    assert "healthy" in out
    assert "1.00e-01" in out and "||dL/dW||" in out


def test_findings_show_bars_explanation_evidence_and_remedies():
    deltas = {f"fc{i}": 0.1 ** (9 - i) for i in range(10)}
    d = diagnose_rows([{"step": 0, "delta_norm": deltas, "grad_norm": deltas}])
    out = text(d)
    assert "1 finding(s): vanishing (critical)" in out
    assert "[critical]" in out  # not swallowed as markup
    lines = [line for line in out.splitlines() if line.startswith("fc")]
    assert [line.split()[0] for line in lines] == [f"fc{i}" for i in range(10)]
    lengths = [line.count("█") for line in lines]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    f = d.findings[0]
    assert f.explanation.split(":")[0][:40] in out.replace("\n", " ").replace("│", "")
    for remedy in f.remedies:
        assert remedy.call in out
    assert "per_layer_gain" in out and "0.1" in out


def test_deep_models_are_sampled():
    deltas = {str(i): 1.0 for i in range(100)}
    out = text(Diagnosis(layers=list(deltas), profile={"delta_norm": deltas}))
    assert f"({MAX_ROWS} of 100 layers)" in out
    assert "\n0 " in out and "\n99 " in out


def test_rich_protocol_and_json():
    origin = {"layer": "a", "where": "backward", "step": 0}
    row = {"step": 0, "delta_norm": {"a": float("inf"), "b": 1.0}, "nonfinite_origin": origin}
    d = diagnose_rows([row])
    assert text(d) == text(render_diagnosis(d))
    data = json.loads(d.to_json())
    assert data["findings"][0]["problem"] == "nonfinite"
    assert data["healthy"] is False


def test_nothing_recorded_is_not_shown_as_healthy():
    out = text(diagnose_rows([]))
    assert "healthy" not in out.replace("not healthy", "")
    assert "nothing diagnosed" in out and "monitor.step()" in out


def test_chain_coverage_and_episode_are_shown():
    nan = float("nan")
    rows = [
        {"step": s, "delta_norm": {f"fc{i}": 1.0 for i in range(6)}, "global_grad_norm": 1.0}
        for s in range(3)
    ]
    rows.append({"step": 3, "delta_norm": {f"fc{i}": 30.0 ** (5 - i) for i in range(6)},
                 "global_grad_norm": 1e6})  # fmt: skip
    rows.append({"step": 4, "global_grad_norm": nan,
                 "nonfinite_origin": {"layer": "fc0", "where": "forward", "step": 4}})  # fmt: skip
    out = text(diagnose_rows(rows))
    assert "root cause first: exploding (step 3) -> nonfinite (step 4)" in out
    assert "coverage: 5 record(s), steps 0-4" in out
    assert "not checked: dead_units" in out
    assert "nonfinite [critical] from step 4 (after exploding)" in out
