"""Under DDP (gloo, 2 CPU processes) the record holds the all-reduced gradient."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

import gradmedic
import ranks
from gradmedic.history import load_history

pytestmark = pytest.mark.slow


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def _worker(rank: int, world: int, port: int, out: str, bucket_view: bool = False) -> None:
    ranks.init(rank, world, port)
    model = nn.parallel.DistributedDataParallel(_model(), gradient_as_bucket_view=bucket_view)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    with gradmedic.watch(model, opt, sink=os.path.join(out, "rank{rank}.jsonl")):
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    ranks.finish()


def _bucket_view_worker(rank: int, world: int, port: int, out: str) -> None:
    _worker(rank, world, port, out, bucket_view=True)  # all-reduced in place, no version bump


@pytest.mark.parametrize("worker", [_worker, _bucket_view_worker], ids=["copy", "bucket_view"])
def test_ddp_records_the_global_gradient(tmp_path, worker) -> None:
    ranks.spawn(worker, 2, str(tmp_path))
    model = _model()
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()  # the full batch in one process
    want = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model[0].parameters()))
    rows = [load_history(tmp_path / f"rank{r}.jsonl")[1][0] for r in range(2)]
    for row in rows:
        assert row["grad_norm"]["module.0"] == pytest.approx(want, rel=1e-5)
    assert json.dumps(rows[0]["grad_norm"]) == json.dumps(rows[1]["grad_norm"])


def _accumulating_worker(rank: int, world: int, port: int, out: str) -> None:
    """Two micro-batches per step, the first under ``no_sync`` (gradient accumulation)."""
    ranks.init(rank, world, port)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    micro = list(zip(x.chunk(2 * world), y.chunk(2 * world), strict=True))[2 * rank : 2 * rank + 2]
    with gradmedic.watch(model, opt, sink=os.path.join(out, "rank{rank}.jsonl")):
        for _ in range(2):
            opt.zero_grad()
            with model.no_sync():
                nn.functional.mse_loss(model(micro[0][0]), micro[0][1]).div(2).backward()
            nn.functional.mse_loss(model(micro[1][0]), micro[1][1]).div(2).backward()
            opt.step()
    ranks.finish()


def test_ddp_gradient_accumulation_records_the_global_gradient_once_per_step(tmp_path) -> None:
    ranks.spawn(_accumulating_worker, 2, str(tmp_path))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    want = []
    with gradmedic.watch(model, opt) as mon:  # the full batch in one process, same two steps
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            want.append({f"module.{i}": _layer_norm(model[i]) for i in (0, 2)})
            opt.step()
    ref = mon.history.rows()
    for r in range(2):
        rows = load_history(tmp_path / f"rank{r}.jsonl")[1]
        assert len(rows) == 2  # one record per optimizer step, not per micro-batch
        for row, expected, single in zip(rows, want, ref, strict=True):
            for layer, value in expected.items():
                assert row["grad_norm"][layer] == pytest.approx(value, rel=1e-5), (r, layer)
            # deltas of each rank's micro-batches, combined over the ranks: the full batch's
            for layer in ("0", "2"):
                got = row["delta_norm"][f"module.{layer}"]
                assert got == pytest.approx(single["delta_norm"][layer], rel=1e-5), (r, layer)
                got = row["output_max"][f"module.{layer}"]
                assert got == pytest.approx(single["output_max"][layer], rel=1e-5), (r, layer)
            total = math.sqrt(sum(v * v for v in expected.values()))
            assert row["global_grad_norm"] == pytest.approx(total, rel=1e-5)


def _layer_norm(layer: nn.Module) -> float:
    return math.sqrt(sum(p.grad.pow(2).sum().item() for p in layer.parameters()))
