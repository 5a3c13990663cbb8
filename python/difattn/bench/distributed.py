"""``difattn bench --world-size P``: the sequence-parallel schemes on P processes, bytes and time per layer.

Each of P processes (gloo on CPU, NCCL on CUDA) holds its shard of one layer's q, k, v (:mod:`difattn.distributed`)
and runs :func:`difattn.distributed.attention` under each scheme; dense attention runs under Ulysses and with the
keys and values all-gathered (what diffusers' "ring" moves). Reported per case: the bytes each rank sends and
receives in the forward pass, counted at the collectives (the backward's collectives mirror them), and the time
per layer (forward, or forward+backward): for each repeat the slowest rank's time, then the fastest repeat.

``computed`` records come from the same scheme code run for every rank of a larger configuration on ``meta``
tensors without a process group (:class:`~difattn.distributed._comm.DryComm`): counted bytes of a size that
cannot run here, not measurements. JSON: ``{"kind": "distributed", "world_size", "backend", "device", "cpu",
"torch", "commit", "threads_per_rank", "records": [...], "computed": [...]}``; a record is ``{"method",
"scheme", "options", "grid", "B", "H", "D", "dtype", "pass", "world_size", "ms", "ms_max", "sent_bytes",
"received_bytes", "payload_bytes", "calls"}`` (byte lists per rank; ``ms`` null for computed records).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..grid import TokenGrid
from .runner import environment


@dataclass(frozen=True)
class Scheme:
    method: str
    scheme: str  # a scheme of difattn.distributed.attention, or "kv_gather" (dense, all-gathered K/V)
    options: dict = field(default_factory=dict)


def cases(radius: float) -> tuple[Scheme, ...]:
    return (
        Scheme("dense", "ulysses"),
        Scheme("dense", "kv_gather"),
        Scheme("clear", "halo", {"radius": radius}),
        Scheme("clear", "ulysses", {"radius": radius}),
        Scheme("grat", "halo", {"group": (8, 8)}),
        Scheme("grat", "ulysses", {"group": (8, 8)}),
        Scheme("pisa", "ulysses", {"density": 0.125, "block_size": 64}),
        Scheme("llsa", "ulysses", {"block_size": 16, "topk": 8}),
        Scheme("linear", "state"),
        Scheme("linear", "ulysses"),
        Scheme("dydila", "state"),
        Scheme("dydila", "ulysses"),
    )


_DYDILA_FLOATS = {"gamma_q": 2.0, "gamma_k": 2.0, "gamma_q_aux": 3.0, "gamma_k_aux": 3.0, "lambda_q": 0.1,
                  "lambda_k": 0.1}


def _inputs(case: Scheme, shape: tuple[int, int, int, int], dtype: torch.dtype, device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    make = torch.rand if case.method == "linear" else torch.randn  # linear attention takes non-negative features
    names = ("q", "k", "v", "q_aux", "k_aux") if case.method == "dydila" else ("q", "k", "v")
    if str(device) == "meta":
        x = {name: torch.empty(shape, dtype=dtype, device="meta") for name in names}
    else:
        x = {name: make(shape, generator=gen).to(device=device, dtype=dtype) for name in names}
    if case.method == "dydila":
        x |= _DYDILA_FLOATS
    return x


def _call(case: Scheme, comm, layout, x: dict):
    from ..distributed._attention import run
    from ..distributed._kv_gather import dense_kv_gather

    if case.scheme == "kv_gather":
        return dense_kv_gather(comm, layout, x["q"], x["k"], x["v"], None)
    extra = {name: value for name, value in x.items() if name not in ("q", "k", "v")}
    return run(case.method, comm, layout, x["q"], x["k"], x["v"], case.scheme, {**case.options, **extra})


def _record(case: Scheme, grid: TokenGrid, B: int, H: int, D: int, dtype, pass_name: str, world: int) -> dict:
    return {
        "method": case.method, "scheme": case.scheme, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in case.options.items()},
        "grid": [grid.frames, grid.height, grid.width, grid.text_tokens, grid.text_position],
        "B": B, "H": H, "D": D, "dtype": str(dtype).removeprefix("torch."), "pass": pass_name, "world_size": world,
    }


def computed(grid: TokenGrid, world: int, *, B: int = 1, H: int = 24, D: int = 128, dtype=torch.bfloat16,
             radius: float = 16.0) -> list[dict]:
    """Counted forward bytes per rank of every case, on ``meta`` tensors for each rank in turn (no process group)."""
    from ..distributed import _traffic
    from ..distributed._comm import DryComm
    from ..distributed._layout import Layout

    layout = Layout.stripes(grid, world)
    records = []
    for case in cases(radius):
        if case.method in ("pisa", "llsa") or case.scheme == "ulysses" and case.method != "dense":
            continue  # Ulysses moves the same tensors whatever the method: see dense
        per_rank = []
        for rank in range(world):
            x = _inputs(case, (B, H, layout.count(rank), D), dtype, "meta", 0)
            if case.method in ("clear", "grat") and case.scheme == "halo":
                x["backend"] = "torch"  # meta tensors run on the reference (the bytes do not depend on it)
            with _traffic.counting() as traffic:
                _call(case, DryComm(rank, world), layout, x)
            per_rank.append(traffic)
        records.append({**_record(case, grid, B, H, D, dtype, "fwd", world), "ms": None, "ms_max": None,
                        **_bytes(per_rank), "computed": True})
    return records


def _bytes(per_rank) -> dict:
    return {
        "sent_bytes": [t.sent for t in per_rank], "received_bytes": [t.received for t in per_rank],
        "payload_bytes": [sum(x.payload for x in t.transfers) for t in per_rank], "calls": per_rank[0].calls,
    }


@dataclass(frozen=True)
class Config:
    world: int
    grid: TokenGrid
    B: int = 1
    H: int = 8
    D: int = 64
    dtype: torch.dtype = torch.float32
    backward: bool = False
    methods: tuple[str, ...] = ("dense", "clear", "grat", "pisa", "llsa", "linear", "dydila")
    radius: float = 8.0
    repeats: int = 5
    json: str = "difattn-bench-distributed.json"


def _time(fn, repeats: int, device) -> tuple[float, float]:
    """(fastest, slowest) over repeats of the slowest rank's time in ms; one warm-up call first."""
    import torch.distributed as dist

    fn()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(float(elapsed))
    return min(samples), max(samples)


def _step(case: Scheme, comm, layout, leaves: dict, backward: bool) -> None:
    out = _call(case, comm, layout, leaves)
    if backward:
        out.sum().backward()


def _measure(rank: int, cfg: Config, device) -> list[dict]:
    import torch.distributed as dist

    from ..distributed import _traffic
    from ..distributed._comm import Comm
    from ..distributed._layout import Layout

    comm, layout = Comm(), Layout.stripes(cfg.grid, cfg.world)
    passes = ["fwd"] + (["fwd+bwd"] if cfg.backward else [])
    records = []
    for case in cases(cfg.radius):
        if case.method not in cfg.methods:
            continue
        full = _inputs(case, (cfg.B, cfg.H, cfg.grid.num_tokens, cfg.D), cfg.dtype, device, 0)
        index = layout.indices(rank, device)
        x = {name: t.index_select(2, index) if isinstance(t, torch.Tensor) else t for name, t in full.items()}
        with _traffic.counting() as traffic:
            _call(case, comm, layout, x)
        counted = [None] * cfg.world
        dist.all_gather_object(counted, traffic)
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            leaves = {n: t.requires_grad_(backward) if isinstance(t, torch.Tensor) else t for n, t in x.items()}
            step = functools.partial(_step, case, comm, layout, leaves, backward)
            ms, ms_max = _time(step, cfg.repeats, device)
            records.append({**_record(case, cfg.grid, cfg.B, cfg.H, cfg.D, cfg.dtype, pass_name, cfg.world),
                            "ms": ms, "ms_max": ms_max, **_bytes(counted), "computed": False})
            if rank == 0:
                sent = max(records[-1]["sent_bytes"]) / 1e6
                print(f"  {case.method:<7} {case.scheme:<9} {pass_name:<7} {ms:9.2f} ms  sent/rank {sent:9.3f} MB",
                      flush=True)
    return records


def _worker(rank: int, cfg: Config, port: int, threads: int) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(threads)
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= cfg.world
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=cfg.world)
    try:
        records = _measure(rank, cfg, device)
        if rank == 0:
            big = TokenGrid(256, 256)
            payload = {"kind": "distributed", "world_size": cfg.world, "backend": dist.get_backend(),
                       **environment(device, cfg.dtype), "threads_per_rank": threads,
                       "records": records,
                       "computed": computed(big, 8, B=1, H=24, D=128, dtype=torch.bfloat16, radius=16.0)}
            Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.json).write_text(json.dumps(payload, indent=1) + "\n")
    finally:
        dist.destroy_process_group()


def run(cfg: Config) -> None:
    """Spawn ``cfg.world`` processes and run every case; rank 0 writes the JSON."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // cfg.world)
    mp.spawn(_worker, args=(cfg, port, threads), nprocs=cfg.world, join=True)
