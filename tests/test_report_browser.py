"""End to end: the lab report opened in headless Chromium.

The report carries a small script that, on load, measures every figure's
bounding box and counts page errors into ``<div id="selfcheck">``;
``--dump-dom`` exposes the result. Console messages (the report logs none)
come from Chromium's stderr.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from html.parser import HTMLParser

import pytest

from gradmedic.lab import runner
from gradmedic.lab.base import LabConfig
from gradmedic.lab.claims import CLAIMS
from gradmedic.report.lab_page import write_report

# Browser-marked tests skip without Chromium, except under CI=true where they fail (conftest).
pytestmark = pytest.mark.browser


class _DomReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.selfcheck: dict[str, str] = {}
        self.claim_rows: list[str] = []
        self.ids: set[str] = set()
        self.toc_links: list[str] = []
        self.summary: dict[str, str] = {}  # verdict -> the text of its count
        self._in_toc = False
        self._verdict: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if attrs.get("id") == "selfcheck":
            self.selfcheck = attrs
        if tag == "tr" and "data-claim" in attrs:
            self.claim_rows.append(attrs["data-claim"])
        if tag == "nav" and attrs.get("id") == "toc":
            self._in_toc = True
        if self._in_toc and tag == "a":
            self.toc_links.append(attrs.get("href", ""))
        if tag == "span" and "count" in attrs.get("class", "").split() and "data-verdict" in attrs:
            self._verdict = attrs["data-verdict"]

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_toc = False
        if tag == "span":
            self._verdict = None

    def handle_data(self, data):
        if self._verdict is not None:
            self.summary[self._verdict] = self.summary.get(self._verdict, "") + data


def _open(chromium, index, profile_dir) -> tuple[str, str]:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile_dir}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,2000",
        "--dump-dom",
        index.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def test_report_renders_in_chromium(chromium, tmp_path):
    results = runner.run(
        ["sigmoid_chain", "rnn_power", "dead_relu", "paper_pascanu2013"],
        LabConfig(quick=True),
        jobs=2,  # figures rendered in worker processes, as `gradmedic lab` does by default
    )
    assert len({r.verdict for r in results}) > 1  # the summary has more than one count
    index = write_report(results, tmp_path / "report", config=LabConfig(quick=True))
    dom, stderr = _open(chromium, index, tmp_path / "profile")

    page = _DomReader()
    page.feed(dom)
    check = page.selfcheck
    assert check.get("data-done") == "1", "the self-check script did not run"
    n_figures = sum(len(r.figures) for r in results)
    assert check["data-expected"] == str(n_figures)
    assert check["data-count"] == str(n_figures)
    assert check["data-figures-ok"] == str(n_figures), f"zero-size figures: {check['data-bad']}"
    assert check["data-errors"] == "0"
    assert check["data-claims"] == str(len(CLAIMS))
    assert page.claim_rows == list(CLAIMS)
    # navigation: one contents entry per experiment plus claims and sources; the summary
    # counts every experiment once
    assert check["data-toc"] == str(len(results) + 2)
    assert check["data-summary"] == str(len(results))
    # every contents entry leads to a section of the page, one per experiment, in order
    targets = [link.removeprefix("#") for link in page.toc_links]
    assert all(t in page.ids for t in targets), set(targets) - page.ids
    assert targets[1:-1] == [r.name for r in results]
    # the summary's count per verdict is the tally of the results' verdicts
    tally = Counter(r.verdict.value for r in results)
    assert {v: int(text.split()[0]) for v, text in page.summary.items()} == dict(tally)
    assert all(text.strip() == f"{tally[v]} {v}" for v, text in page.summary.items())
    # every panel of every figure draws data (a line, points, bars or an image)
    assert int(check["data-panels"]) >= n_figures
    assert check["data-empty"] == "", f"empty panels: {check['data-empty']}"

    console = [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert console == [], "\n".join(console)


def test_selfcheck_reports_an_empty_panel(chromium, tmp_path):
    from gradmedic.lab import plotting
    from gradmedic.lab.base import Result, Verdict

    fig, (full, empty) = plotting.figure(2)
    full.plot([1, 2, 3], [1, 4, 9])
    full.bar([1, 2], [3, 4])
    empty.set_title("nothing here")
    result = Result(
        "s", "e", {}, "r", Verdict.HOLDS, name="exp", claims=["K1"], title="t",
        figures={"f": fig},
    )  # fmt: skip
    index = write_report([result], tmp_path / "report")
    dom, _ = _open(chromium, index, tmp_path / "profile")
    page = _DomReader()
    page.feed(dom)
    assert page.selfcheck["data-panels"] == "2"
    assert page.selfcheck["data-empty"].endswith("axes_2")
