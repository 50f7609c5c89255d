"""Step-time overhead of gradmedic under FSDP2 (gloo, CPU processes), by number of ranks.

Run:  python benchmarks/distributed_overhead.py [--ranks 2 4] [--rounds 5] [--steps 10]

Each rank count starts that many processes (one torch thread each) training the
same MLP (``fully_shard`` per Linear) on the same global batch. Configurations
are interleaved round by round; each reports the median over rounds of its
per-step wall time (max over ranks) as a ratio to the bare step of the same
round, and the time to read the records afterwards (``history.rows()``: waits
for the reductions issued at record time and finalizes them) per record.

Configurations:
  bare        forward + backward + SGD step under FSDP2
  gm_norms    watch(deltas=False, updates=False): sharded per-layer gradient norms
  gm_default  gradmedic.watch(): + per-rank deltas, update ratios (a collective
              on measured steps)
  torch_clip  torch.nn.utils.clip_grad_norm_ on the DTensor gradients (its own
              per-mesh reduction every step: the floor for any global norm)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradmedic

CONFIGS = ("bare", "gm_norms", "gm_default", "torch_clip")


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _one(config: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Any:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = {"gm_norms": {"deltas": False, "updates": False}, "gm_default": {}}.get(config)
    mon = gradmedic.watch(model, opt, **watch) if watch is not None else None
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if config == "torch_clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        opt.step()
    step_s = (time.perf_counter() - start) / steps
    read_s = 0.0
    if mon is not None:
        start = time.perf_counter()
        rows = mon.history.rows()
        read_s = (time.perf_counter() - start) / max(len(rows), 1)
        mon.close()
    return step_s, read_s


def _worker(rank: int, world: int, port: int, args: Any, out: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    model = _model(args.width, args.depth)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=g).chunk(world)[rank]
    y = torch.randn(args.batch, 1, generator=g).chunk(world)[rank]
    _one("bare", model, x, y, 2)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            results[config].append(_one(config, model, x, y, args.steps))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Print one table row per (rank count, configuration)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"FSDP2 MLP {args.depth}x{args.width}, batch {args.batch}, gloo CPU, 1 thread/rank")
    print("| ranks | config | step / bare (median) | bare step ms | read ms / record |")
    print("|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for world in args.ranks:
        queue = ctx.SimpleQueue()
        mp.spawn(_worker, args=(world, _free_port(), args, queue), nprocs=world, join=True)
        gathered = queue.get()
        rounds = range(args.rounds)
        # per round: the slowest rank's step (collectives make every rank wait for it)
        step = {c: [max(r[c][k][0] for r in gathered) for k in rounds] for c in CONFIGS}
        read = {c: [max(r[c][k][1] for r in gathered) for k in rounds] for c in CONFIGS}
        bare = step["bare"]
        for config in CONFIGS:
            ratio = statistics.median(s / b for s, b in zip(step[config], bare, strict=True))
            print(
                f"| {world} | {config} | {ratio:.3f} | {statistics.median(bare) * 1e3:.2f} | "
                f"{statistics.median(read[config]) * 1e3:.2f} |"
            )


if __name__ == "__main__":
    main()
