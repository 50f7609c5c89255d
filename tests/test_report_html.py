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
from gradmedic.report.html import claims_table, flatten, inline_svg, load_results, write_report


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
