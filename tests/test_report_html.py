"""The HTML report: claims table, one inline SVG per figure, results.json."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from gradmedic.errors import GradmedicError
from gradmedic.lab import plotting
from gradmedic.lab.base import LabConfig, Result, Verdict
from gradmedic.lab.claims import CLAIMS
from gradmedic.report.lab_page import claims_table, flatten, inline_svg, load_results, write_report


def _fig(values):
    fig, ax = plotting.figure()
    plotting.profile(ax, range(1, len(values) + 1), values, label="measured")
    plotting.label(ax, "t", "layer", "norm")
    return fig


def _results():
    a = Result(
        name="exp_a",
        claims=["K1", "K2"],
        title="A <title>",
        setup="setup a",
        expected="expected a",
        numbers={
            "ratio": 0.125,
            "list": [1, 2],
            "checks": {"K1": {"c1": True}, "K2": {"c2": False}},
        },
        rule="rule a",
        verdict=Verdict.PARTLY,
        per_claim={"K1": Verdict.HOLDS, "K2": Verdict.FAILS},
        explanation="because",
        figures={"one": _fig([1.0, 0.1, 0.01]), "two": _fig([1.0, 2.0, 4.0])},
    )
    b = Result(
        name="exp_b",
        claims=["K1"],
        title="B",
        setup="s",
        expected="e",
        numbers={"x": 1},
        rule="r",
        verdict=Verdict.HOLDS,
        figures={"only": _fig([3.0, 2.0])},
    )
    c = Result(
        name="exp_c",
        claims=["R7"],
        title="C",
        setup="",
        expected="",
        numbers={},
        rule="",
        verdict=Verdict.ERROR,
        explanation="The experiment raised RuntimeError: boom",
        error="Traceback (most recent call last):\nRuntimeError: boom",
    )
    return [a, b, c]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.stack, self.figure_svgs, self.ids = [], [], {}, []
        self._fig = None
        self._in_claims = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table" and attrs.get("id") == "claims":
            self._in_claims = True
        if tag == "tr" and self._in_claims and "data-claim" in attrs:
            self.rows.append(attrs["data-claim"])
        if tag == "figure":
            self._fig = attrs["id"]
            self.figure_svgs[self._fig] = 0
        if tag == "svg" and self._fig is not None:
            self.figure_svgs[self._fig] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_claims = False
        if tag == "figure":
            self._fig = None


def test_claims_table_combines_verdicts_per_claim():
    rows = {r["id"]: r for r in claims_table(_results())}
    assert list(rows) == list(CLAIMS)
    assert rows["K1"]["verdict"] == "holds"  # exp_a K1 holds, exp_b holds
    assert [t["name"] for t in rows["K1"]["experiments"]] == ["exp_a", "exp_b"]
    assert rows["K2"]["verdict"] == "does not hold"
    assert rows["R7"]["verdict"] == "experiment failed"
    assert rows["K5"]["verdict"] == "not tested" and rows["K5"]["experiments"] == []


def test_write_report_html_and_json(tmp_path):
    index = write_report(_results(), tmp_path / "rep", config=LabConfig(quick=True, seed=3))
    html = index.read_text()
    parsed = _Collect()
    parsed.feed(html)
    assert parsed.rows == list(CLAIMS)  # every claim listed, in order
    # one inline <svg> per figure, three figures in all
    assert sorted(parsed.figure_svgs.values()) == [1, 1, 1]
    assert len(parsed.ids) == len(set(parsed.ids))  # ids unique across inlined figures
    assert "A &lt;title&gt;" in html  # escaped
    assert "RuntimeError: boom" in html
    assert 'data-expected="3"' in html
    payload = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert payload["config"] == {"quick": True, "seed": 3, "mnist_dir": None}
    assert [c["id"] for c in payload["claims"]] == list(CLAIMS)
    a = payload["results"][0]
    assert a["figures"] == {"one": "figures/exp_a-one.svg", "two": "figures/exp_a-two.svg"}
    assert a["per_claim"] == {"K1": "holds", "K2": "does not hold"}
    for path in a["figures"].values():
        svg = (tmp_path / "rep" / path).read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg


def test_report_regenerates_from_results_json(tmp_path):
    write_report(_results(), tmp_path / "a")
    loaded = load_results(tmp_path / "a" / "results.json")
    assert [r.name for r in loaded] == ["exp_a", "exp_b", "exp_c"]
    assert loaded[0].per_claim["K2"] is Verdict.FAILS
    index = write_report(loaded, tmp_path / "b", source_dir=tmp_path / "a")
    parsed = _Collect()
    parsed.feed(index.read_text())
    assert sorted(parsed.figure_svgs.values()) == [1, 1, 1]
    first = (tmp_path / "a" / "figures" / "exp_a-one.svg").read_text()
    assert (tmp_path / "b" / "figures" / "exp_a-one.svg").read_text() == first


def test_load_results_errors(tmp_path):
    with pytest.raises(GradmedicError, match="not found"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [{"name": 1}]}')
    with pytest.raises(GradmedicError, match=r"not a gradmedic lab results\.json"):
        load_results(bad)


def test_inline_svg_prefixes_ids_and_references():
    svg = (
        '<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "x" "y">\n'
        '<svg><defs><path id="m1"/><clipPath id="p2"/></defs>'
        '<use xlink:href="#m1"/><g clip-path="url(#p2)"/><text>#m1 stays</text></svg>'
    )
    out = inline_svg(svg, "exp one")
    assert out.startswith("<svg")
    assert re.findall(r'id="([^"]+)"', out) == ["exp-one-m1", "exp-one-p2"]
    assert 'xlink:href="#exp-one-m1"' in out and "url(#exp-one-p2)" in out
    assert "#m1 stays" in out


def test_flatten_scalars_and_short_lists():
    rows = dict(
        flatten({"a": 0.123456789, "b": {"c": [1, 2], "d": list(range(50))}, "checks": {"x": 1}})
    )
    assert rows == {"a": "0.1235", "b.c": "[1, 2]"}


def test_rerun_of_a_subset_removes_only_the_lab_s_stale_figures(tmp_path):
    out = tmp_path / "rep"
    write_report(_results(), out)
    first = {p.name for p in (out / "figures").glob("*.svg")}
    assert first == {"exp_a-one.svg", "exp_a-two.svg", "exp_b-only.svg"}
    mine = out / "figures" / "my-notes.svg"  # a user's file beside the lab's
    mine.write_text("<svg/>")
    (out / "keep.txt").write_text("x")
    write_report([_results()[1]], out)
    assert {p.name for p in (out / "figures").glob("*.svg")} == {"exp_b-only.svg", "my-notes.svg"}
    assert (out / "keep.txt").read_text() == "x"


def test_stale_figure_paths_outside_figures_are_never_deleted(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    victim = tmp_path / "victim.svg"
    victim.write_text("<svg/>")
    forged = {"results": [{"figures": {"x": "../victim.svg"}}, {"figures": {"y": "index.html"}}]}
    (out / "results.json").write_text(json.dumps(forged))
    write_report([_results()[1]], out)
    assert victim.exists() and (out / "index.html").exists()


def test_results_json_has_numbers_only_and_flags_non_finite_values(tmp_path):
    r = _results()[1]
    r.numbers = {"loss": [2.0, float("inf"), float("nan")], "ok": {"x": -float("inf")}}
    write_report([r], tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    rec = json.loads(text)["results"][0]
    assert rec["numbers"] == {"loss": [2.0, None, None], "ok": {"x": None}}
    assert rec["nonfinite"] == {"/loss/1": "inf", "/loss/2": "nan", "/ok/x": "-inf"}
    back = load_results(tmp_path / "results.json")[0]
    assert back.numbers["loss"][0] == 2.0 and back.numbers["loss"][1] == float("inf")
    assert back.numbers["ok"]["x"] == -float("inf")


def test_contents_summary_sources_and_back_to_top(tmp_path):
    results = _results()
    results.append(
        Result(
            name="exp_d",
            claims=["R7"],
            title="D",
            setup="s",
            expected="e",
            numbers={"checks": {"c": True}},
            rule="r",
            verdict=Verdict.INCONCLUSIVE,
            figures={"f": _fig([1.0, 2.0])},
        )
    )
    html = write_report(results, tmp_path).read_text()
    toc = re.search(r'<nav id="toc".*?</nav>', html, re.S).group(0)
    for r in results:
        assert f'href="#{r.name}"' in toc
    summary = re.search(r'<p class="summary" id="summary">(.*?)</p>', html, re.S).group(1)
    counts = dict(
        (v, int(n)) for n, v in re.findall(r'data-verdict="[^"]+">(\d+) ([^<]+)</span>', summary)
    )
    expected = {}
    for r in results:
        expected[r.verdict.value] = expected.get(r.verdict.value, 0) + 1
    assert counts == expected
    assert html.count('href="#top"') == len(results) + 1  # each section and the sources
    assert 'id="sources"' in html and 'id="source-004"' in html
    assert "Vanishing and exploding gradients" in html
    assert "seeds 00" not in html  # the source texts are cited as sources, not "seeds"
    assert "inconclusive" in html


def test_previous_seconds_only_from_a_run_like_this_one(tmp_path):
    from gradmedic.report.lab_page import previous_seconds

    config = LabConfig(quick=True, seed=3)
    results = _results()
    for k, r in enumerate(results):
        r.seconds = 1.5 * (k + 1)
    write_report(results, tmp_path, config=config)
    assert previous_seconds(tmp_path, config) == {
        r.name: 1.5 * (k + 1) for k, r in enumerate(results)
    }
    assert previous_seconds(tmp_path, LabConfig(quick=False, seed=3)) == {}  # another size
    assert previous_seconds(tmp_path / "none", config) == {}
    (tmp_path / "results.json").write_text("not json")
    assert previous_seconds(tmp_path, config) == {}
