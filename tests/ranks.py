"""Spawning gloo ranks on CPU for the distributed tests, with a teardown that cannot abort."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init(rank: int, world: int, port: int) -> None:
    """Join the gloo process group on localhost, one thread per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def finish() -> None:
    """Leave the group once every rank is done, then exit without interpreter teardown.

    A rank's results are on disk by now. Gloo's worker threads have intermittently aborted
    the process (SIGABRT, "terminate called without an active exception") during Python's
    own teardown after a passing run; ``os._exit`` skips that teardown.
    """
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``worker(rank, world, port, *args)`` on ``world`` processes and wait for all."""
    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)
