"""str(diagnosis) is a short summary; rich and HTML renderings; nothing cut at 80 columns."""

from __future__ import annotations

import io

import torch
from rich.console import Console

import gradmedic
from gradmedic.diagnose import diagnose_rows
from gradmedic.findings import Coverage, Diagnosis, Episode, Finding, Problem, Remedy, Severity
from gradmedic.report.terminal import PIPE_WIDTH, console

LONG_CALL = (
    "gradmedic.clip_grad_norm_(model.parameters(), max_norm=0.25)  # the median pre-blow-up norm"
)


def _diagnosis() -> Diagnosis:
    finding = Finding(
        Problem.EXPLODING, Severity.CRITICAL,
        ["encoder.embedding_with_a_rather_long_name", "rnn", "decoder"],
        {"total_gain": 314159.0, "per_layer_gain": 12.5},
        "The gradient grows 12.5x per layer going back.",
        [Remedy("clip", "Clip the global gradient norm", LONG_CALL),
         Remedy("init", "He initialization", "gradmedic.init.apply(model, 'he')")],
        step=40, episode=Episode(onset=12, peak=40, peak_value=314159.0, last=57, records=46,
                                 measure="total_gain"),
    )  # fmt: skip
    return Diagnosis(
        findings=[finding], layers=["encoder", "rnn", "decoder"],
        coverage=Coverage(steps=60, first_step=0, last_step=59, checked=["exploding"]),
    )  # fmt: skip


def test_str_is_a_short_summary() -> None:
    text = str(_diagnosis())
    assert text.splitlines() == [
        "gradmedic: 1 finding(s): exploding (critical) (60 records, steps 0-59)",
        "- exploding [critical] steps 12-57 peak total_gain 3.14e+05 at step 40; "
        "layers encoder.embedding_with_a_rather_long_name, rnn, decoder",
        f"  fix: Clip the global gradient norm -> {LONG_CALL}",
    ]
    assert len(repr(_diagnosis())) > len(text)  # the dataclass repr stays the full data


def test_str_of_healthy_and_empty_runs() -> None:
    rows = [{"step": s, "grad_norm": {"a": 1.0, "b": 1.0}, "delta_norm": {"a": 1.0, "b": 1.0}}
            for s in range(3)]  # fmt: skip
    healthy = diagnose_rows(rows)
    assert healthy.healthy
    assert str(healthy) == "gradmedic: healthy, no gradient problem found (3 records, steps 0-2)"
    assert str(diagnose_rows([])).startswith("gradmedic: nothing diagnosed: no step was recorded")


def test_repr_html_escapes_and_lists_findings() -> None:
    d = _diagnosis()
    d.findings[0] = Finding(**{**d.findings[0].__dict__, "layers": ["<script>"]})
    page = d._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("<li>") == 1 and "3.14e+05" in page


def test_rich_view_at_80_columns_cuts_nothing() -> None:
    buf = io.StringIO()
    Console(width=80, file=buf, color_system=None).print(_diagnosis())
    text = buf.getvalue()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    flat = "".join(line.strip("│ ") for line in text.splitlines())
    assert "encoder.embedding_with_a_rather_long_name" in flat.replace(" ", "")
    assert LONG_CALL.replace(" ", "") in flat.replace(" ", "")


def test_console_for_a_pipe_is_wide(monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert console().width == PIPE_WIDTH  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "120")
    assert console().width == 120


def test_a_run_that_recorded_nothing_says_what_to_call() -> None:
    model = torch.nn.Linear(3, 2)
    with gradmedic.watch(model) as mon:  # no optimizer: records at monitor.step()
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
    text = str(mon.diagnose())
    assert text.startswith("gradmedic: nothing diagnosed: backward passes ran but monitor.step()")
    assert "call monitor.step(loss=loss) after each loss.backward()" in text


def test_layer_lists_elide_only_what_they_hide() -> None:
    from gradmedic.report.summary import finding_line

    for layers, shown in [
        (["0", "2", "4", "6"], "layers 0, 2, 4, 6"),
        (["0", "2", "4", "6", "8"], "layers 0, 2, 4, ..., 8"),
    ]:
        f = Finding(Problem.VANISHING, Severity.WARNING, layers, {}, "", [])
        assert finding_line(f).endswith(shown)
