"""Clean CLI errors and exit codes: 0 ok, 1 findings, 2 bad input, 3 user code raised, 4 bug.

Most tests run ``python -m gradmedic`` in a subprocess, as a user would: the exit
status is the real one and stderr is exactly what the terminal shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import gradmedic
from gradmedic.cli.app import app
from gradmedic.errors import GradmedicError, UserCodeError, user_code_error

MODELS = textwrap.dedent(
    """\
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 64)

        def forward(self, x):
            return self.fc(x)


    def custom():
        return Net()


    def seq():
        return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


    def raises():
        raise ValueError("no data here")


    def bad_setup():
        model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        return model, (torch.randn(8, 10), torch.randint(0, 10, (8,)))


    def relu():
        return nn.ReLU()


    def healthy():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        return model, (torch.randn(8, 16), torch.randint(0, 4, (8,)))


    def sigmoid():
        torch.manual_seed(0)
        layers = [m for _ in range(19) for m in (nn.Linear(16, 16), nn.Sigmoid())]
        return nn.Sequential(*layers, nn.Linear(16, 4)), torch.randn(8, 16)


    def mismatched_setup():
        x, y = torch.randn(64, 5), torch.randn(64, 1)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        return {"model": model, "data": ((x, y), (x, y)), "loss_fn": nn.MSELoss()}
    """
)


def line_of(text: str) -> int:
    """The 1-based line of MODELS that holds ``text``."""
    return next(i for i, line in enumerate(MODELS.splitlines(), 1) if text in line)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "model.py").write_text(MODELS)
    (tmp_path / "syn.py").write_text("import torch\n\ndef make(:\n    pass\n")
    return tmp_path


def gm(cwd, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRADMEDIC_DEBUG"}
    if debug:
        env["GRADMEDIC_DEBUG"] = "1"
    env["COLUMNS"] = "80"  # one-line errors must not depend on a wide terminal
    return subprocess.run(
        [sys.executable, "-m", "gradmedic", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``error: ...`` line on stderr (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---- 3: the user's code raised ------------------------------------------------------


def test_factory_that_raises_names_file_and_line(work):
    proc = gm(work, "check", "model.py:raises")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert f"your code raised in model.py:{line_of('no data here')} (in raises)" in line
    assert "ValueError: no data here" in line


def test_syntax_error_names_file_and_line(work):
    proc = gm(work, "check", "syn.py:make")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert "syn.py:3" in line and "SyntaxError" in line


def test_input_shape_that_does_not_fit_a_custom_forward(work):
    proc = gm(work, "check", "model.py:custom", "--input-shape", "32,10")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert f"your code raised in model.py:{line_of('return self.fc(x)')} (in forward)" in line
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x10 and 784x64)" in line
    assert "(32, 10)" in line  # the input's shape


def test_input_shape_that_does_not_fit_a_sequential(work):
    # No frame of the user's file in the traceback: name the layer and the factory.
    proc = gm(work, "check", "model.py:seq", "--input-shape", "32,10")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert f"model.py:{line_of('def seq')} (seq)" in line
    assert "layer '0' (Linear)" in line
    assert "32x10 and 784x64" in line and "(32, 10)" in line


def test_check_setup_whose_model_does_not_fit_its_data(work):
    proc = gm(work, "check", "model.py:bad_setup")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert f"model.py:{line_of('def bad_setup')} (bad_setup)" in line and "8x10 and 784x64" in line


def test_fix_setup_whose_model_does_not_fit_its_data(work):
    proc = gm(work, "fix", "model.py:mismatched_setup", "--steps", "5")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert (
        f"model.py:{line_of('def mismatched_setup')} (mismatched_setup)" in line
        and "64x5 and 4x8" in line
    )


def test_debug_prints_the_traceback(work):
    proc = gm(work, "--debug", "check", "model.py:raises")
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr
    assert f'model.py", line {line_of("no data here")}, in raises' in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: your code raised")
    proc = gm(work, "check", "model.py:custom", "--input-shape", "2,3", debug=True)  # env var
    assert proc.returncode == 3 and "Traceback" in proc.stderr


# ---- 2: bad usage or bad input ---------------------------------------------------------


def test_absurd_input_shape_is_refused_before_allocating(work):
    proc = gm(work, "check", "model.py:seq", "--input-shape", "100000,100000,1000")
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "40,000.0 GB" in line and "2 GiB" in line and "smaller shape" in line


def test_lab_out_that_cannot_be_written_fails_before_any_experiment(work):
    blocker = work / "somefile"
    blocker.write_text("not a folder")
    proc = gm(work, "lab", "rnn_power", "--quick", "--out", str(blocker / "out"))
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert f"--out {blocker / 'out'} cannot be written" in line
    assert "rnn_power" not in proc.stdout  # no experiment ran
    assert blocker.read_text() == "not a folder"


def test_report_of_a_binary_file_names_it(work):
    path = work / "run.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    proc = gm(work, "report", str(path))
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert str(path) in line and "not UTF-8 text" in line


def test_theory_rejects_a_negative_elu_alpha(work):
    proc = gm(work, "theory", "-a", "elu", "--alpha", "-1")
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "--alpha" in line and "> 0" in line and "-1" in line


def test_model_without_parameters_is_bad_input(work):
    proc = gm(work, "check", "model.py:relu", "--input-shape", "4,3")
    assert proc.returncode == 2, proc.stderr
    assert "has no trainable parameters" in one_error_line(proc)


def test_typer_usage_error_is_2_without_traceback(work):
    proc = gm(work, "check", "model.py:seq", "--no-such-option")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "No such option" in proc.stderr


# ---- 0 and 1 -----------------------------------------------------------------------------


def test_healthy_exits_0_and_findings_exit_1(work):
    proc = gm(work, "check", "model.py:healthy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["healthy"] is True
    proc = gm(work, "check", "model.py:sigmoid")
    assert proc.returncode == 1, proc.stderr
    assert "vanishing" in proc.stdout and "Traceback" not in proc.stderr


# ---- in-process: theory parameters, bugs (4), the library API ---------------------------

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--sigma-w", "0"], "sigma_w must be a finite number > 0"),
        (["--sigma-w", "nan"], "sigma_w must be a finite number > 0"),
        (["--sigma-b", "inf"], "sigma_b must be a finite number >= 0"),
        (["--depth", "0"], "depth must be an integer >= 1"),
        (["--depth", "100000000"], "depth must be at most 100,000"),
        (["--q0", "0"], "q0 must be a finite number > 0"),
        (["-a", "elu", "--alpha", "0"], "alpha must be a finite number > 0"),
        (["-a", "leaky_relu", "--slope", "nan"], "slope must be a finite number"),
    ],
)
def test_theory_parameters_are_validated(args, text):
    result = runner.invoke(app, ["theory", *args])
    assert result.exit_code == 2, result.output
    assert text in result.output and "Traceback" not in result.output


def test_a_gradmedic_bug_exits_4_with_a_hint(tmp_path, monkeypatch):
    import gradmedic.diagnose

    path = tmp_path / "run.jsonl"
    model = nn.Linear(3, 1)
    with gradmedic.watch(model, sink=path) as mon:
        model(torch.randn(2, 3)).sum().backward()
        mon.step()

    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(gradmedic.diagnose, "diagnose_rows", broken)
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 4, result.output
    assert "gradmedic failed unexpectedly" in result.output and "--debug" in result.output
    assert "KeyError: 'oops'" in result.output


def test_check_refuses_a_model_without_trainable_parameters():
    with pytest.raises(GradmedicError, match=r"no trainable parameters.*nn\.Sequential"):
        gradmedic.check(nn.ReLU(), torch.randn(4, 3))
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(GradmedicError, match=r"all are frozen.*requires_grad_"):
        gradmedic.check(frozen, torch.randn(4, 3))


def test_user_code_error_tells_the_model_from_gradmedic():
    model = nn.Sequential(nn.Linear(784, 64))
    x = torch.randn(32, 10)
    with pytest.raises(RuntimeError) as info:
        model(x)
    err = user_code_error(info.value, model=model, inputs=x)
    assert isinstance(err, UserCodeError) and isinstance(err.original, RuntimeError)
    assert f"{os.path.relpath(__file__)}:" in str(err)  # this file is the "user's code"
    info.value.__traceback__ = info.value.__traceback__.tb_next  # only torch frames left
    err = user_code_error(info.value, source="model.py:3 (make)", model=model, inputs=x)
    assert isinstance(err, UserCodeError)
    assert "model.py:3 (make)" in str(err) and "layer '0' (Linear)" in str(err)
    assert "(32, 10)" in str(err)
    with pytest.raises(ValueError) as info:  # gradmedic's own input check: not user code
        gradmedic.check(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(5))
    info.value.__traceback__ = info.value.__traceback__.tb_next  # as the CLI sees it
    assert user_code_error(info.value) is None


def test_the_cli_runs_where_click_is_not_installed() -> None:
    # Typer >= 0.2x vendors click and no longer installs it; the dev extras pull it in
    # through other packages, a plain `pip install gradmedic[lab]` does not.
    code = (
        "import sys; sys.modules['click'] = None\n"  # any `import click` now raises
        "from gradmedic.cli.app import main\n"
        "sys.argv = ['gradmedic', 'check', 'no_such_file.py:factory']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "ModuleNotFoundError" not in done.stderr and "Traceback" not in done.stderr
    assert done.returncode == 2, done.stderr
    assert "no_such_file.py" in done.stderr
