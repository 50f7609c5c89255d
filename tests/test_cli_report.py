"""``gradmedic report`` diagnoses a saved run without the model."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

import gradmedic
from gradmedic.cli.app import app

runner = CliRunner()


def _record(path, act: type[nn.Module], depth: int = 20) -> None:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(32, 32), act()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt, sink=path):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 32)).pow(2).mean().backward()
            opt.step()


def test_report_of_a_saved_sigmoid_run_finds_vanishing(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    _record(path, nn.Sigmoid)
    result = runner.invoke(app, ["report", str(path), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert "vanishing" in [f["problem"] for f in data["findings"]]
    assert data["layers"][0] == "0"


def test_report_bad_path_is_one_line(tmp_path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "no history file" in result.output
    assert "Traceback" not in result.output


def test_report_truncated_file_keeps_records(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    _record(path, nn.Sigmoid)
    text = path.read_text()
    path.write_text(text + '{"step": 3, "grad_no')  # a crash mid-write
    result = runner.invoke(app, ["report", str(path), "--json"])
    assert result.exit_code == 1
    assert "vanishing" in result.output


def test_report_html_writes_a_run_report(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    _record(path, nn.Sigmoid)
    result = runner.invoke(app, ["report", str(path), "--html", str(tmp_path / "html")])
    assert result.exit_code == 1, result.output
    page = (tmp_path / "html" / "index.html").read_text()
    assert page.count('<figure class="fig"') >= 3 and 'data-problem="vanishing"' in page
    assert "report: " in result.output
