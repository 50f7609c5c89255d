"""``gradmedic check --optimizer ... --lr ...``: the step-size judgement on the CLI."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from gradmedic.cli.app import app

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def regression():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=gen) * torch.tensor([3.0, 1.0, 1.0, 0.5])
        model = nn.Linear(4, 1, bias=False)
        nn.init.zeros_(model.weight)
        return model, (x, torch.randn(64, 1, generator=gen))
    """
)


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(FACTORIES)
    return f"{path}:regression"


def invoke(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def test_an_sgd_step_past_the_limit_exits_1_with_the_safe_lr(target):
    # top Hessian eigenvalue of this regression is about 2 * 9 = 18: 2/lr = 10 < 18
    result = invoke(target, "--optimizer", "sgd", "--lr", "0.2", "--momentum", "0", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    (finding,) = data["findings"]
    assert finding["problem"] == "unstable_updates"
    ev = finding["evidence"]
    assert ev["limit"] == pytest.approx(10.0)
    assert ev["largest_safe_lr"] == pytest.approx(2 / ev["sharpness_init"], rel=1e-6)


def test_a_small_adam_step_is_healthy(target):
    result = invoke(target, "--optimizer", "adam", "--lr", "1e-3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["context"]["step_size"]["optimizer"] == "Adam"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizer", "lbfgs", "--lr", "0.1"], "--optimizer must be one of"),
        (["--optimizer", "sgd"], "needs --lr"),
        (["--optimizer", "sgd", "--lr", "-1"], "--lr must be a positive"),
        (["--optimizer", "sgd", "--lr", "nan"], "--lr must be a positive"),
        (["--optimizer", "sgd", "--lr", "0.1", "--momentum", "1.5"], "--momentum must be in"),
        (["--optimizer", "adam", "--lr", "0.1", "--momentum", "0.9"], "uses betas"),
        (["--lr", "0.1"], "need --optimizer"),
        (["--optimizer", "sgd", "--lr", "0.1", "--trial-batch", "0"], "trial_batch must be >= 1"),
    ],
)
def test_bad_optimizer_options_are_one_line_and_exit_2(target, extra, message):
    result = invoke(target, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
