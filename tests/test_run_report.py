"""The HTML run report: heatmaps, depth profiles, updates and loss with episodes, findings."""

from __future__ import annotations

import math
import re
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from gradmedic.diagnose import diagnose_rows
from gradmedic.findings import Diagnosis, Episode, Finding, Problem, Remedy, Severity
from gradmedic.report.run_report import depth_profiles, heatmap, over_steps, write_run_report

LAYERS = ["a", "b", "c"]


def _rows(n: int = 6) -> list[dict]:
    rows = []
    for s in range(n):
        g = 10.0 ** (s - 2)  # grows tenfold per step: exploding from step 3 on
        rows.append({
            "step": s,
            "grad_norm": {"a": g * 100, "b": g * 10, "c": g},
            "delta_norm": {"a": g * 50, "b": g * 5, "c": g / 2},
            "update_ratio": {"a": 1e-3 * (s + 1), "b": 2e-3, "c": 3e-3},
            "loss": 1.0 + s,
        })  # fmt: skip
    return rows


def _finding() -> Finding:
    return Finding(
        Problem.EXPLODING, Severity.CRITICAL, ["a", "b"], {"total_gain": 100.0},
        "It grows.", [Remedy("clip", "Clip at 1", "gradmedic.clip_grad_norm_(p, 1)")],
        step=5, episode=Episode(onset=3, peak=5, peak_value=100.0, last=5, records=3,
                                measure="total_gain"),
    )  # fmt: skip


def test_heatmap_holds_log10_of_each_layer_and_step() -> None:
    rows = _rows()
    rows[2]["grad_norm"]["b"] = 0.0  # not on a log scale: drawn as missing
    fig = heatmap(rows, LAYERS, "grad_norm")
    image = fig.axes[0].get_images()[0].get_array()
    assert image.shape == (3, 6)
    assert image[0, 4] == pytest.approx(math.log10(100 * 10.0**2))
    assert image[2, 0] == pytest.approx(-2.0)
    assert np.ma.is_masked(image[1, 2]) or math.isnan(float(image[1, 2]))
    assert heatmap([{"step": 0}], LAYERS, "delta_norm") is None


def test_depth_profiles_at_onset_and_peak() -> None:
    ((caption, fig),) = depth_profiles(_rows(), LAYERS, [_finding()])
    assert "exploding" in caption
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    onset = lines["||dL/dW||, onset (step 3)"]
    assert list(onset) == pytest.approx([10.0 * 100, 10.0 * 10, 10.0])
    assert list(lines["||dL/d out||, peak (step 5)"]) == pytest.approx([5e4, 5e3, 5e2])


def test_over_steps_shades_each_episode() -> None:
    fig = over_steps(_rows(), LAYERS, [_finding()])
    _ax_u, ax_l = fig.axes[:2]
    spans = [p for p in ax_l.patches]
    assert len(spans) == 1
    x0, x1 = spans[0].get_x(), spans[0].get_x() + spans[0].get_width()
    assert (x0, x1) == pytest.approx((2.5, 5.5))  # onset 3 .. last 5, half a step each side
    (loss,) = ax_l.get_lines()
    assert list(loss.get_ydata()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert over_steps([{"step": 0}], LAYERS, []) is None


def test_page_has_figures_findings_and_remedies(tmp_path) -> None:
    d = Diagnosis(findings=[_finding()], layers=LAYERS)
    index = write_run_report(_rows(), d, tmp_path / "r", title="t <1>")
    page = index.read_text()
    assert page.count('<figure class="fig"') == 4  # 2 heatmaps, 1 depth profile, updates/loss
    assert len(list((tmp_path / "r" / "figures").glob("*.svg"))) == 4
    assert "gradmedic.clip_grad_norm_(p, 1)" in page and "t &lt;1&gt;" in page
    assert 'data-problem="exploding"' in page


def test_partial_log_leaves_figures_out_with_a_note(tmp_path) -> None:
    rows = [{"step": s, "grad_norm": {"a": 1.0, "b": 0.5}} for s in range(3)]
    index = write_run_report(rows, diagnose_rows(rows), tmp_path)
    page = index.read_text()
    assert "no delta_norm recorded" in page and "no update ratio or loss recorded" in page
    assert page.count('<figure class="fig"') == 2  # grad heatmap, depth profile at the last row


class _Selfcheck(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if attrs.get("id") == "selfcheck":
            self.attrs = attrs


@pytest.mark.browser
def test_run_report_renders_in_chromium(chromium, tmp_path) -> None:
    d = Diagnosis(findings=[_finding()], layers=LAYERS)
    index = write_run_report(_rows(), d, tmp_path / "r")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", "--dump-dom",
           index.as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    page = _Selfcheck()
    page.feed(done.stdout)
    check = page.attrs
    assert check.get("data-done") == "1", "the self-check script did not run"
    assert check["data-expected"] == check["data-count"] == check["data-figures-ok"] == "4"
    assert check["data-errors"] == "0" and check["data-findings"] == "1"
    console = [line for line in done.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert console == [], "\n".join(console)
