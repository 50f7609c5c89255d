"""Under DDP (gloo, 2 CPU processes) the record holds the all-reduced gradient."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradmedic
from gradmedic.history import load_history

pytestmark = pytest.mark.slow


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    with gradmedic.watch(model, opt, sink=os.path.join(out, "rank{rank}.jsonl")):
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_records_the_global_gradient(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = _model()
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()  # the full batch in one process
    want = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model[0].parameters()))
    rows = [load_history(tmp_path / f"rank{r}.jsonl")[1][0] for r in range(2)]
    for row in rows:
        assert row["grad_norm"]["module.0"] == pytest.approx(want, rel=1e-5)
    assert json.dumps(rows[0]["grad_norm"]) == json.dumps(rows[1]["grad_norm"])
