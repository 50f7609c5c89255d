"""``gradmedic lab``: listing, usage errors, a subset run, and the whole quick lab (slow)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gradmedic.cli.app import app
from gradmedic.lab import runner as lab_runner
from gradmedic.lab.base import EXPERIMENTS, Result, Verdict, experiment
from gradmedic.lab.claims import CLAIMS

cli = CliRunner()


def test_list_names_every_experiment():
    out = cli.invoke(app, ["lab", "--list"], terminal_width=200)
    assert out.exit_code == 0, out.output
    for name in lab_runner.registry():
        assert name in out.output


def test_unknown_experiment_is_one_line_and_exit_2(tmp_path):
    out = cli.invoke(
        app, ["lab", "no_such_thing", "--out", str(tmp_path / "r")], terminal_width=400
    )
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown experiment 'no_such_thing'" in lines[0]
    assert not (tmp_path / "r").exists()


def test_missing_mnist_folder_is_a_usage_error(tmp_path):
    out = cli.invoke(
        app, ["lab", "rnn_power", "--mnist", str(tmp_path / "none")], terminal_width=400
    )
    assert out.exit_code == 2
    assert "not a folder" in out.output


def test_subset_run_writes_report(tmp_path):
    out_dir = tmp_path / "rep"
    out = cli.invoke(
        app,
        ["lab", "rnn_power", "--quick", "--seed", "1", "--out", str(out_dir)],
        terminal_width=200,
    )
    assert out.exit_code == 0, out.output
    assert (out_dir / "index.html").is_file()
    payload = json.loads((out_dir / "results.json").read_text())
    assert [r["name"] for r in payload["results"]] == ["rnn_power"]
    assert payload["config"] == {"quick": True, "seed": 1, "mnist_dir": None}
    assert (out_dir / payload["results"][0]["figures"]["bptt"]).is_file()
    assert "rnn_power" in out.output and "holds" in out.output  # summary table


def test_jobs_run_experiments_in_workers_and_write_the_same_report(tmp_path):
    names = ["rnn_power", "sigmoid_chain"]
    payloads = {}
    for jobs in ("1", "2"):
        out_dir = tmp_path / f"rep{jobs}"
        args = ["lab", *names, "--quick", "--jobs", jobs, "--out", str(out_dir)]
        out = cli.invoke(app, args, terminal_width=200)
        assert out.exit_code == 0, out.output
        assert f"{jobs} at a time" in out.output
        payloads[jobs] = json.loads((out_dir / "results.json").read_text())
        for r in payloads[jobs]["results"]:
            for path in r["figures"].values():
                assert (out_dir / path).read_text().lstrip().startswith("<?xml")
    one, two = ([r["numbers"] for r in payloads[j]["results"]] for j in ("1", "2"))
    assert one == two


def test_jobs_below_one_is_a_usage_error(tmp_path):
    out = cli.invoke(app, ["lab", "rnn_power", "--jobs", "0", "--out", str(tmp_path)])
    assert out.exit_code == 2


def test_mnist_folder_is_used(tmp_path):
    from test_lab_framework import _write_mnist

    _write_mnist(tmp_path, n_train=40, n_test=10)
    out_dir = tmp_path / "rep"
    args = ["lab", "lr_divergence", "--quick", "--mnist", str(tmp_path), "--out", str(out_dir)]
    out = cli.invoke(app, args, terminal_width=200)
    assert out.exit_code == 0, out.output
    payload = json.loads((out_dir / "results.json").read_text())
    assert payload["config"]["mnist_dir"] == str(tmp_path)
    assert payload["results"][0]["setup"].startswith("mnist:")


def test_failed_experiment_gives_exit_1_and_is_in_the_report(tmp_path):
    def boom(config):
        raise RuntimeError("cli boom")

    experiment("_t_cli_boom", ["K7"], "fails on purpose")(boom)
    try:
        out = cli.invoke(app, ["lab", "_t_cli_boom", "--out", str(tmp_path)], terminal_width=200)
    finally:
        EXPERIMENTS.pop("_t_cli_boom")
    assert out.exit_code == 1
    assert "cli boom" in (tmp_path / "index.html").read_text()


@pytest.mark.slow
def test_whole_quick_lab_runs_without_errors(tmp_path):
    out = cli.invoke(app, ["lab", "--quick", "--out", str(tmp_path)], terminal_width=200)
    payload = json.loads((tmp_path / "results.json").read_text())
    errors = [r["name"] for r in payload["results"] if r["verdict"] == Verdict.ERROR.value]
    assert errors == [], out.output
    assert out.exit_code == 0
    tested = {c["id"] for c in payload["claims"] if c["verdict"] != "not tested"}
    assert tested == set(CLAIMS)
    assert all(isinstance(Result.from_dict(r), Result) for r in payload["results"])
    # the figures on disk are exactly the ones results.json lists (speed is measured in
    # docs/benchmarks.md, not asserted here)
    listed = {p for r in payload["results"] for p in r["figures"].values()}
    assert {f"figures/{p.name}" for p in (tmp_path / "figures").glob("*.svg")} == listed
    assert f"{len(payload['results'])} experiments" in out.output


def test_unwritable_out_is_refused_before_any_experiment_runs(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(lab_runner, "run_one", lambda exp, config: ran.append(exp.name))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = cli.invoke(
        app, ["lab", "rnn_power", "--quick", "--out", str(blocker / "rep")], terminal_width=400
    )
    assert out.exit_code == 2, out.output
    assert "--out" in out.output and "cannot be written" in out.output
    assert ran == []
