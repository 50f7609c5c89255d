"""TensorBoard: the series read back from the event file with tensorboard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.integrations.series import scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradmedic.integrations.tensorboard import TensorBoardWriter

SCRIPTS = Path(__file__).parent / "scripts"


def _events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _sigmoid_stack() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


def _train(tb: TensorBoardWriter, steps: int = 4) -> list[dict]:
    model = _sigmoid_stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt) as monitor:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 1)).backward()
            opt.step()
            tb.log(monitor)
        tb.findings(monitor)
    tb.close()
    return monitor.history.rows()


def test_summary_series_match_the_records(tmp_path) -> None:
    rows = _train(TensorBoardWriter(tmp_path))
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"gradmedic/grad_norm/global", "gradmedic/grad_norm/0", "gradmedic/grad_norm/24",
            "gradmedic/delta_norm/0", "gradmedic/total_gain/input_over_output"} <= tags  # fmt: skip
    assert not any(
        t.startswith("gradmedic/grad_norm/2") and t != "gradmedic/grad_norm/24" for t in tags
    )  # fmt: skip  (no per-layer flood by default)
    glob = _series(acc, "gradmedic/grad_norm/global")
    assert [s for s, _ in glob] == [r["step"] for r in rows]
    assert [v for _, v in glob] == pytest.approx([r["global_grad_norm"] for r in rows], rel=1e-6)
    gain = _series(acc, "gradmedic/total_gain/input_over_output")
    expected = [r["delta_norm"]["0"] / r["delta_norm"]["24"] for r in rows]
    assert [v for _, v in gain] == pytest.approx(expected, rel=1e-5)
    # the sigmoid stack vanishes: one point at the finding's onset, and a text line
    assert "gradmedic/finding/vanishing" in tags
    assert "gradmedic/findings/text_summary" in acc.Tags()["tensors"]


def test_per_layer_series_on_request(tmp_path) -> None:
    rows = _train(TensorBoardWriter(tmp_path, per_layer=True), steps=2)
    tags = set(_events(tmp_path).Tags()["scalars"])
    assert {f"gradmedic/grad_norm/{name}" for name in rows[0]["grad_norm"]} <= tags


def test_a_summary_writer_can_be_passed(tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    _train(TensorBoardWriter(writer), steps=2)
    writer.add_scalar("user/own", 1.0, 0)  # still open: the writer belongs to the caller
    writer.close()
    assert "user/own" in _events(tmp_path).Tags()["scalars"]


def test_scalars_skip_non_finite_values() -> None:
    row = {"step": 0, "global_grad_norm": float("inf"), "grad_norm": {"a": float("nan"), "b": 2.0}}
    assert scalars(row, ["a", "b"]) == {"gradmedic/grad_norm/b": 2.0}


def test_gradmedic_run_logs_to_tensorboard(tmp_path) -> None:
    from gradmedic.cli.run import run_script

    out, tb = tmp_path / "out", tmp_path / "tb"
    code = run_script(SCRIPTS / "save_and_exit.py", ["4", str(tmp_path / "m.pt")], out=out,
                      sink=None, html=False, tensorboard=tb)  # fmt: skip
    assert code == 3
    steps = [s for s, _ in _series(_events(tb), "gradmedic/grad_norm/global")]
    assert steps == [0, 1, 2, 3]
