"""Runs a function on P gloo processes on this CPU (``torch.multiprocessing.spawn``), each test on a free port and
under a time limit, so a collective that waits forever fails the test instead of hanging CI."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 90.0) -> None:
    """``fn(rank, world, *args)`` on ``world`` processes; raises the first rank's exception, or after ``timeout``
    seconds kills them all and fails."""
    context = mp.start_processes(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world} ranks did not finish in {timeout:.0f} s")
