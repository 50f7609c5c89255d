"""``gradmedic fix``: loading a setup, the table, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import textwrap

import pytest
from torch import nn
from typer.testing import CliRunner

from gradmedic.autorepair import TrainOutcome, TrainSettings, search
from gradmedic.cli.app import app
from gradmedic.findings import Diagnosis, Finding, Problem, Severity
from gradmedic.remedies import catalog

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn
    from gradmedic.autorepair import Setup

    def _data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
        return (x[:200], y[:200]), (x[200:], y[200:])

    def regression():
        return Setup(lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)),
                     _data(), nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))

    def as_dict():
        return {"model": nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)),
                "data": _data(), "loss_fn": nn.MSELoss()}

    def wrong():
        return 42

    def unknown_key():
        return {"model": nn.Linear(4, 1), "data": _data(), "loss_fn": nn.MSELoss(), "lr": 1}
    """
)

runner = CliRunner()


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "setups.py"
    path.write_text(FACTORIES)
    return path


VANISH = Finding(
    Problem.VANISHING,
    Severity.CRITICAL,
    ["0"],
    {},
    "shrinks",
    [catalog.init_scheme("he"), catalog.clip_norm(1.0)],
)


@pytest.fixture
def scripted(monkeypatch):
    """Scripted runs: the original has a finding; ``cured`` remedies remove it."""

    def install(cured):
        def train(setup, remedies, *, budget, seed, horizon=None):
            names = {r.name for r in remedies}
            findings = [] if names & cured else [VANISH]
            losses = [1.0] * 10 + [0.2] * 10
            return TrainOutcome(
                nn.Linear(1, 1),
                Diagnosis(findings),
                0.5,
                0.5,
                budget.steps,
                0.01,
                False,
                TrainSettings(),
                losses,
            )

        monkeypatch.setattr(search, "train", train)
        monkeypatch.setattr(search, "preflight", lambda *a, **k: Diagnosis([]))

    return install


def test_healthy_setup(factory_file):
    result = runner.invoke(app, ["fix", f"{factory_file}:regression", "--steps", "40"])
    assert result.exit_code == 0, result.output
    assert "no repair needed" in result.stdout
    assert "original" in result.stdout


def test_json_output_and_dict_protocol(factory_file):
    result = runner.invoke(app, ["fix", f"{factory_file}:as_dict", "--steps", "30", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "healthy"
    assert data["budget"]["steps"] == 30
    assert data["candidates"][0]["steps"] == 30
    assert data["snippet"] == "# no repair needed"


def test_repaired_prints_table_and_snippet(factory_file, scripted):
    scripted(cured={"clip_norm"})
    result = runner.invoke(app, ["fix", f"{factory_file}:regression", "--steps", "20"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "repaired by clip_norm(1)" in out
    assert "gradmedic.clip_grad_norm_(model.parameters(), max_norm=1)" in out
    assert "Paste into your training script" in out


def test_repaired_json(factory_file, scripted):
    scripted(cured={"clip_norm"})
    result = runner.invoke(app, ["fix", f"{factory_file}:regression", "--json"])
    data = json.loads(result.stdout)
    assert data["status"] == "repaired"
    assert [r["name"] for r in data["remedies"]] == ["clip_norm"]
    # the preflight is healthy: a training-loop remedy goes first
    assert data["candidates"][1]["remedies"] == ["clip_norm(1)"]
    accepted = [c for c in data["candidates"] if c["accepted"]]
    assert len(accepted) == 1 and accepted[0]["steps"] == 200 and accepted[0]["stage"] == "accepted"
    # successive halving: short runs first, each row says why it stopped
    assert data["candidates"][1]["steps"] == 200 // 9
    assert {c["stage"] for c in data["candidates"][1:]} <= {
        "halved", "promoted", "passed", "rejected", "accepted", "screened", "not applicable"
    }  # fmt: skip
    assert data["steps_spent"] <= data["steps_total"] == 12 * 200


def test_unrepaired_exits_1(factory_file, scripted):
    scripted(cured=set())
    result = runner.invoke(app, ["fix", f"{factory_file}:regression", "--max-candidates", "2"])
    assert result.exit_code == 1
    assert "no candidate was healthy" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{f}:wrong"], "a setup must be a gradmedic.autorepair.Setup or a dict"),
        (["{f}:unknown_key"], "unknown setup key(s) ['lr']"),
        (["{f}:missing"], "defines no callable named 'missing'"),
        (["nowhere.py:regression"], "does not exist"),
        (["{f}"], "TARGET must look like path/to/file.py:factory"),
        (["{f}:regression", "--steps", "0"], "Budget.steps must be a positive int"),
        (["{f}:regression", "--strategy", "genetic"], "strategy must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(factory_file, args, message):
    argv = ["fix", *(a.format(f=factory_file) for a in args)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.output
