"""``difattn bench --interleaved`` (CPU): each method's attention timed alone and between two torch ``Linear``
layers, ``Linear(H·D → 3·H·D) → attention → Linear(H·Dv → H·D)``, as in a DiT block (the qkv projection, the
attention, the output projection), so the table shows what the torch ops around the attention cost it: torch's
OpenMP threads keep spinning for a while after an op, and a kernel whose threads are not those competes with them
for the cores. ``ratio = in_chain_ms / alone_ms``; 1 means no cost.

The attention reads the same q, k, v in both timings (the first input set of the speed records), so the two differ
only in what ran just before; the first Linear's output is not fed to it, the second Linear reads its output
(transposed to ``(B, N, H·Dv)`` as a block does). Forward only, without autograd. Dense SDPA (a torch op itself)
is timed the same way as a reference.

JSON: ``{"device", "cpu", "torch", ..., "kind": "interleaved", "records": [record, ...]}`` (the header of
:func:`.runner.environment`); a record: ``{"method", "backend", "options", "B", "H", "N", "D", "dtype", "grid", "alone_ms", "alone_median_ms",
"in_chain_ms", "in_chain_median_ms", "ratio", "median_ratio", "linear_ms", "threads", "cpu_threads"}``: times as
the speed records count them (the fastest repeat) plus the medians, ``linear_ms`` the first Linear's time, ``threads``
torch's intra-op thread count, ``cpu_threads`` the runtime of the Rust kernels' loops (``"openmp"`` or
``"rayon"``, see ``difattn info``; ``null`` without the compiled core).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .._native import core, core_status
from .cases import CASES, Case, Shape
from .progress import Progress
from .runner import BenchConfig, _make_inputs, environment, jsonable, options_label, runnable_backends
from .timing import Timing, time_cpu, time_cpu_between

DENSE = Case("dense")  # dense SDPA's row: a torch op between torch ops


def _attention(case: Case, shape: Shape, backend: str) -> Callable:
    if case is DENSE:
        return lambda q, k, v, e: F.scaled_dot_product_attention(q, k, v)
    return lambda q, k, v, e: case.call(q, k, v, e, shape.grid, backend)


def _layers(shape: Shape, cfg: BenchConfig) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    width = shape.heads * shape.head_dim
    torch.manual_seed(0)
    qkv = torch.nn.Linear(width, 3 * width).to(device=cfg.device, dtype=cfg.dtype)
    proj = torch.nn.Linear(width, width).to(device=cfg.device, dtype=cfg.dtype)
    return qkv, proj


def measure(cfg: BenchConfig, shape: Shape, case: Case, backend: str) -> dict:
    """One record: ``case`` on ``backend`` alone and between the two Linear layers."""
    qkv, proj = _layers(shape, cfg)
    q, k, v, extra = _make_inputs(cfg, shape, requires_grad=False)[0]
    x = torch.randn(shape.batch, shape.grid.num_tokens, shape.heads * shape.head_dim, generator=torch.Generator().manual_seed(1))
    x = x.to(device=cfg.device, dtype=cfg.dtype)
    attention = _attention(case, shape, backend)

    def project(out: torch.Tensor, _: int):
        return proj(out.transpose(1, 2).reshape(shape.batch, shape.grid.num_tokens, -1))

    with torch.no_grad():
        alone = time_cpu(lambda i: attention(q, k, v, extra), budget_s=cfg.cpu_budget_s)
        in_chain = time_cpu_between(lambda i: qkv(x), lambda i: attention(q, k, v, extra), project,
                                    budget_s=cfg.cpu_budget_s)
        linear = time_cpu(lambda i: qkv(x), budget_s=cfg.cpu_budget_s / 4)
    return _record(cfg, shape, case, backend, alone, in_chain, linear)


def _record(cfg: BenchConfig, shape: Shape, case: Case, backend: str, alone: Timing, in_chain: Timing,
            linear: Timing) -> dict:
    ok, _ = core_status()
    return {
        "method": case.method, "backend": backend, "options": jsonable(case.options),
        "B": shape.batch, "H": shape.heads, "N": shape.grid.num_tokens, "D": shape.head_dim,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "grid": [shape.grid.frames, shape.grid.height, shape.grid.width, shape.grid.text_tokens, shape.grid.text_position],
        "alone_ms": alone.typical, "alone_median_ms": alone.median,
        "in_chain_ms": in_chain.typical, "in_chain_median_ms": in_chain.median,
        "ratio": in_chain.typical / alone.typical, "median_ratio": in_chain.median / alone.median,
        "linear_ms": linear.typical, "threads": torch.get_num_threads(),
        "cpu_threads": core().cpu_threads()[0] if ok else None,
    }


def run_interleaved(cfg: BenchConfig) -> list[dict]:
    """A record per shape and backend of each method's first case (dense SDPA first); CPU only."""
    if cfg.device.type != "cpu":
        raise ValueError(f"--interleaved times CPU kernels between torch ops; device {cfg.device} is not the CPU")
    table = cfg.cases or CASES
    steps = []
    for shape in cfg.shapes:
        steps.append((shape, DENSE, "torch"))
        steps += [(shape, table[m][0], b) for m in cfg.methods for b in runnable_backends(m, cfg.device)]
    progress = Progress(len(steps))
    records = []
    for shape, case, backend in steps:
        progress.update(f"{case.method} {backend} {shape.label} interleaved")
        records.append(measure(cfg, shape, case, backend))
        progress.step()
    progress.close()
    return records


def format_interleaved_table(records: list[dict]) -> str:
    width = max([len("options")] + [len(options_label(r["options"])) for r in records])
    head = (f"{'method':<7} {'options':<{width}} {'backend':<7} {'shape':>10} {'alone':>8} {'in chain':>9} "
            f"{'ratio':>6} {'median':>7} {'Linear':>8} {'threads':>12}")
    lines = [head, "-" * len(head)]
    for r in records:
        f, h, w, t, _ = r["grid"]
        shape = (f"{f}x" if f > 1 else "") + f"{h}x{w}" + (f"+{t}" if t else "")
        threads = f"{r['threads']} {r['cpu_threads'] or ''}".strip() if r["backend"] == "rust" else str(r["threads"])
        lines.append(
            f"{r['method']:<7} {options_label(r['options']):<{width}} {r['backend']:<7} {shape:>10} "
            f"{r['alone_ms']:>8.2f} {r['in_chain_ms']:>9.2f} {r['ratio']:>5.2f}x {r['median_ratio']:>6.2f}x "
            f"{r['linear_ms']:>8.2f} {threads:>12}"
        )
    return "\n".join(lines)


def write_json(path: Path, cfg: BenchConfig, records: list[dict]) -> None:
    payload = {**environment(cfg.device, cfg.dtype), "kind": "interleaved", "records": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
