from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from gradmedic.cli.app import app
from gradmedic.cli.check import parse_shape

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def sigmoid():
        return nn.Sequential(*[m for _ in range(19) for m in (nn.Linear(16, 16), nn.Sigmoid())],
                             nn.Linear(16, 4))

    def healthy():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        return m, (torch.randn(8, 16), torch.randint(0, 4, (8,)))

    def with_inputs():
        return healthy()[0], torch.randn(8, 16)

    def wrong():
        return 42

    not_callable = 3
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(FACTORIES)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def test_findings_exit_1_and_name_the_problem(factory_file):
    result = invoke(f"{factory_file}:sigmoid", "--input-shape", "8,16")
    assert result.exit_code == 1, result.output
    assert "vanishing" in result.output


def test_healthy_exits_0_and_json(factory_file):
    result = invoke(f"{factory_file}:healthy", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["healthy"] is True and data["layers"] == ["0", "2"]
    assert invoke(f"{factory_file}:with_inputs").exit_code == 0


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("{f}", [], "path/to/file.py:factory"),
        ("/no/such/file.py:f", [], "does not exist"),
        ("{f}:missing", [], "no callable named 'missing'"),
        ("{f}:not_callable", [], "no callable named 'not_callable'"),
        ("{f}:wrong", ["--input-shape", "2,16"], "returned int"),
        ("{f}:sigmoid", [], "no batch"),
        ("{f}:sigmoid", ["--input-shape", "8,x"], "--input-shape"),
    ],
)
def test_errors_are_one_line_and_exit_2(factory_file, target, extra, message):
    result = invoke(target.format(f=factory_file), *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_parse_shape():
    assert parse_shape("32,784") == (32, 784)
    with pytest.raises(ValueError, match="positive integers"):
        parse_shape("0,3")
