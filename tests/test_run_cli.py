"""`gradmedic run`: unmodified scripts watched from outside, manual loops included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gradmedic.autoattach import AutoAttach
from gradmedic.cli.app import app
from gradmedic.cli.run import run_script
from gradmedic.history import load_history

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parent.parent


def _diagnosis(out: Path) -> dict:
    return json.loads((out / "diagnosis.json").read_text())


def _problems(out: Path) -> set[str]:
    return {f["problem"] for f in _diagnosis(out)["findings"]}


# ---------------------------------------------------------------- AutoAttach, in process
def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def test_the_preflights_trial_copies_are_not_watched() -> None:
    """check(optimizer=...) steps copies of the model: only the script's own model is watched."""
    import gradmedic

    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    with AutoAttach(every=1) as session:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gradmedic.check(model, x, y, nn.functional.mse_loss, optimizer=opt)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    (w,) = session.watched
    rows = [r for r in w.monitor.history.rows() if not r.get("skipped")]
    assert w.model is model and len(rows) == 3


def test_manual_loop_records_once_per_update_after_clipping() -> None:
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    expected = []
    with AutoAttach(every=1) as session:
        model = _mlp()
        for _ in range(3):
            model.zero_grad()
            for half in (x[:16], x[16:]):  # gradient accumulation: two backwards, one update
                nn.functional.mse_loss(model(half), y[:16]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            grads = [p.grad.clone() for p in model.parameters()]
            expected.append(
                float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
            )
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)  # .data: no version-counter bump
    (w,) = session.watched
    rows = w.monitor.history.rows()
    assert w.mode == "manual" and [r["step"] for r in rows] == [0, 1, 2]
    got = [r["global_grad_norm"] for r in rows]
    assert got == pytest.approx(expected, rel=1e-5)
    assert max(got) <= 0.05 + 1e-6  # recorded after the script's clipping
    assert all("loss" in r for r in rows)


def test_backward_without_update_is_not_a_step() -> None:
    with AutoAttach(every=1) as session:
        model = _mlp()
        model(torch.randn(4, 6)).sum().backward()
        model.zero_grad()  # cleared without any parameter change
        model(torch.randn(4, 6)).sum().backward()
    rows = session.watched[0].monitor.history.rows()
    assert [r for r in rows if not r.get("skipped")] == []  # the abandoned backward: skipped


def test_optimizer_run_is_bit_identical_and_hooks_go_away(tmp_path) -> None:
    def train() -> nn.Module:
        torch.manual_seed(1)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
        torch.save(model, tmp_path / "m.pt")
        return model

    originals = (torch.optim.Optimizer.__init__, nn.Module.zero_grad, torch.Tensor.backward)
    bare = train()
    with AutoAttach(every=1) as session:
        watched = train()
    assert (torch.optim.Optimizer.__init__, nn.Module.zero_grad, torch.Tensor.backward) == originals
    (w,) = session.watched
    assert w.mode == "optimizer" and w.monitor.history.total == 4
    for a, b in zip(bare.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.modules())
    assert all(not m._forward_hooks for m in watched.modules())


# ---------------------------------------------------------------- scripts
def test_rnn_lm_without_clipping_explodes(tmp_path) -> None:
    out = tmp_path / "out"
    args = ["--init", "0.3", "--nhid", "64", "--epochs", "1", "--save", str(tmp_path / "m.pt")]
    code = run_script(SCRIPTS / "word_lm.py", args, out=out, sink=out / "run.jsonl")
    assert code == 0
    assert "exploding" in _problems(out)
    _header, rows = load_history(out / "run.jsonl")
    # 4000 tokens in 10 columns -> 400 rows; bptt 35 -> range(0, 399, 35): 12 manual updates
    assert [r["step"] for r in rows] == list(range(len(range(0, 399, 35))))
    assert (out / "index.html").is_file()
    assert (tmp_path / "m.pt").is_file()  # torch.save(model) ran, and the script loaded it back


@pytest.mark.slow
def test_lstm_lm_with_clipping_does_not_explode(tmp_path) -> None:
    out = tmp_path / "out"
    args = ["--model", "LSTM", "--clip", "0.25", "--epochs", "1", "--save", str(tmp_path / "m.pt")]
    assert run_script(SCRIPTS / "word_lm.py", args, out=out, sink=None) == 0
    diagnosis = _diagnosis(out)
    assert diagnosis["coverage"]["steps"] == 12
    assert not {"exploding", "exploding_in_time", "divergence"} & _problems(out)


@pytest.mark.slow
def test_lightning_script_is_watched(tmp_path) -> None:
    pytest.importorskip("lightning")
    out = tmp_path / "out"
    assert run_script(SCRIPTS / "lightning_fit.py", [], out=out, sink=out / "run.jsonl") == 0
    header, rows = load_history(out / "run.jsonl")
    # The module's `net`. Lightning steps with a closure, so the model's first forward (which
    # attaches the monitor) runs inside step 0, after its pre-hooks: step 0 is still recorded,
    # from the gradients it stepped on (without update ratios, measured from step 1 on).
    assert header["layers"][0] == "0" and [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "update_ratio" not in rows[0] and "update_ratio" in rows[1]
    assert "vanishing" in _problems(out)
    assert all(isinstance(r.get("loss"), float) for r in rows)


def test_a_compiled_model_under_autocast_is_watched_and_saved(tmp_path) -> None:
    # The global forward pre-hook must stay out of Dynamo's trace of the compiled forward.
    out, saved = tmp_path / "out", tmp_path / "model.pt"
    assert run_script(SCRIPTS / "compiled_amp.py", [str(saved)], out=out, sink=None) == 0
    assert _diagnosis(out)["coverage"]["steps"] == 4
    assert "vanishing" in _problems(out)
    model = torch.load(saved, weights_only=False)
    assert isinstance(model, nn.Sequential) and not model._forward_hooks


def test_sys_exit_code_and_torch_save_survive(tmp_path) -> None:
    out = tmp_path / "out"
    model = tmp_path / "model.pt"
    result = CliRunner().invoke(
        app, ["run", "--out", str(out), str(SCRIPTS / "save_and_exit.py"), "5", str(model)]
    )
    assert result.exit_code == 3, result.output
    assert isinstance(torch.load(model, weights_only=False), nn.Sequential)
    assert len(load_history(out / "run.jsonl")[1]) == 5
    assert _diagnosis(out)["coverage"]["steps"] == 5


def test_interrupt_exits_130_with_the_diagnosis_so_far(tmp_path) -> None:
    out = tmp_path / "out"
    assert run_script(SCRIPTS / "interrupted.py", [], out=out, sink=None) == 130
    assert _diagnosis(out)["coverage"]["steps"] == 3


def test_script_that_raises_keeps_its_traceback_and_exit_code(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "gradmedic", "run", "--out", str(out), "--no-html",
         str(SCRIPTS / "raises.py")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "ValueError: the data loader ran dry at step 4" in done.stderr
    assert 'raises.py", line 12' in done.stderr and "runpy" not in done.stderr
    assert "gradmedic: " in done.stderr  # the diagnosis of the 4 steps taken
    assert len(load_history(out / "run.jsonl")[1]) == 4


def test_a_script_with_a_syntax_error_shows_pythons_lines_only(tmp_path, capsys) -> None:
    script = tmp_path / "broken.py"
    script.write_text('import torch\nprint("hi"\n')
    assert run_script(script, [], out=tmp_path / "out", sink=None) == 1
    err = capsys.readouterr().err
    assert 'broken.py", line 2' in err and "SyntaxError" in err
    assert "Traceback" not in err and "runpy" not in err and "gradmedic/cli" not in err


def test_a_compiled_model_adds_no_torch_warning_about_global_hooks(tmp_path) -> None:
    script = tmp_path / "compiled.py"
    script.write_text(
        "import torch\n"
        "model = torch.nn.Sequential(\n"
        "    torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
        "fast = torch.compile(model)\n"
        "opt = torch.optim.SGD(model.parameters(), 0.01)\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); fast(torch.randn(16, 8)).pow(2).mean().backward(); opt.step()\n"
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_script(script, [], out=tmp_path / "out", sink=None) == 0
        assert not any("global hooks" in str(f[1]) for f in warnings.filters)  # filter removed
    assert not [w for w in caught if "global hooks" in str(w.message)]


def test_missing_script_is_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.py")])
    assert result.exit_code == 2
    assert "no script at" in result.output


def test_gradients_zeroed_by_hand_are_not_recorded_as_vanishing() -> None:
    with pytest.warns(RuntimeWarning, match="cleared by hand"), AutoAttach(every=1) as session:
        model = _mlp()
        for _ in range(3):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad.zero_()  # before any trigger: the record would read zeros
    rows = session.watched[0].monitor.history.rows()
    assert [r for r in rows if not r.get("skipped")] == []


def test_a_model_the_script_watches_itself_is_left_to_it() -> None:
    import gradmedic

    with AutoAttach(every=1) as session:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradmedic.watch(model, opt) as own:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 6)).sum().backward()
                opt.step()
    assert session.watched == [] and len(own.history) == 2


_LOOP = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(5):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(torch.randn(16, 6)), torch.randn(16, 1))
    {backward}
    {step}
"""


@pytest.mark.parametrize(
    ("backward", "step", "status", "code"),
    [
        ("loss.backward()", "opt.step()", "healthy", 0),
        ("pass", "opt.step()", "nothing_checked", 1),  # the loop forgot loss.backward()
        ("pass", "pass", None, 1),  # no training step at all: nothing diagnosed
    ],
)
def test_fail_on_findings_fails_on_any_diagnosis_that_is_not_healthy(
    tmp_path: Path, backward: str, step: str, status: str | None, code: int
) -> None:
    script = tmp_path / "loop.py"
    script.write_text(_LOOP.format(backward=backward, step=step))
    out = tmp_path / "out"
    got = run_script(script, [], out=out, sink=None, html=False, fail_on_findings=True)
    assert got == code
    if status is not None:
        assert _diagnosis(out)["status"] == status
    assert run_script(script, [], out=tmp_path / "again", sink=None, html=False) == 0
