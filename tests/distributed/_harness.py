"""P gloo processes on this CPU that run test functions, each test on every rank under a time limit.

Starting processes costs seconds each (importing torch), so a :class:`Ranks` pool of a given size starts once
per test session (see ``conftest.py``) and runs every test's function on all its ranks. A test whose ranks do not
all finish in time (a collective waiting forever) fails, and the pool is killed and started afresh for the next.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, jobs, results) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        fn, args = jobs.get()
        try:
            fn(rank, world, *args)
            results.put((rank, None))
        except BaseException:  # reported to the test, which fails with it
            results.put((rank, traceback.format_exc()))


class Ranks:
    """``world`` processes in one gloo group, running ``fn(rank, world, *args)`` on request."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._processes: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world)]
        self._processes = [
            ctx.Process(target=_serve, args=(r, self.world, port, self._jobs[r], self._results), daemon=True)
            for r in range(self.world)
        ]
        for p in self._processes:
            p.start()

    def run(self, fn, *args, timeout: float = 60.0) -> None:
        """Run ``fn`` on every rank; raise the first rank's error, or ``TimeoutError`` after ``timeout`` s."""
        if not self._processes or not all(p.is_alive() for p in self._processes):
            self.close()
            self._start()
        for jobs in self._jobs:
            jobs.put((fn, args))
        errors, deadline = {}, time.monotonic() + timeout
        for _ in range(self.world):
            try:
                rank, error = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()  # ranks left waiting in a collective: start afresh next time
                if errors:
                    break
                raise TimeoutError(f"{fn.__name__} did not finish on {self.world} ranks in {timeout:.0f} s") from None
            if error is not None:
                errors[rank] = error
                deadline = min(deadline, time.monotonic() + 5.0)  # the others may wait on the failed rank
        if errors:
            rank = min(errors)
            raise AssertionError(f"{fn.__name__} failed on rank {rank} of {self.world}:\n{errors[rank]}")

    def close(self) -> None:
        """Stop the ranks (killed: a graceful gloo shutdown waits on every rank, a stuck one included)."""
        for p in self._processes:
            p.kill()
        for p in self._processes:
            p.join(timeout=5)
        self._processes = []
