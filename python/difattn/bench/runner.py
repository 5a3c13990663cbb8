"""Runs the cases, prints a table and writes JSON.

JSON schema: ``{"device", "torch", "triton", "commit", "threads", "records": [record, ...]}`` with each record
``{"method", "backend", "pass", "B", "H", "N", "D", "dtype", "options", "density", "ms", "ms_min", "ms_max",
"dense_ms", "flex_ms", "work_fraction", "speedup", "efficiency", "peak_mem_mb", "rel_err_dense"}``.
``speedup = dense_ms / ms``; ``efficiency = speedup * work_fraction`` (the method's FLOP rate on the work it
must do, as a fraction of the dense kernel's).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backends import BACKENDS
from ..grid import TokenGrid
from ..testing import rel_error
from .cases import DEFAULT_CASES, Case
from .progress import Progress
from .timing import Timing, time_call

_ROTATIONS = 3  # distinct input sets cycled through while timing


@dataclass
class BenchConfig:
    device: torch.device
    grids: tuple[TokenGrid, ...]
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    backward: bool = False
    methods: tuple[str, ...] = tuple(c.method for c in DEFAULT_CASES)
    cpu_budget_s: float = 1.0


@dataclass
class _Inputs:
    sets: list = field(default_factory=list)

    def get(self, i: int):
        return self.sets[i % len(self.sets)]


def _make_inputs(cfg: BenchConfig, n: int, requires_grad: bool) -> _Inputs:
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.batch, cfg.heads, n, cfg.head_dim)

    def rand(*s):
        x = torch.randn(*s, generator=gen).to(device=cfg.device, dtype=cfg.dtype)
        return x.requires_grad_(requires_grad)

    out = _Inputs()
    for _ in range(_ROTATIONS):
        q, k, v = rand(*shape), rand(*shape), rand(*shape)
        gamma = 1.0 + 2.0 * torch.rand(shape[:3], generator=gen).to(device=cfg.device, dtype=cfg.dtype)
        lam = 0.25 * torch.rand(shape[:3], generator=gen).to(device=cfg.device, dtype=cfg.dtype)
        out.sets.append((q, k, v, (rand(*shape), rand(*shape), gamma, lam)))
    return out


def _timed(fn, inputs: _Inputs, backward: bool, cfg: BenchConfig) -> Timing:
    def call(i: int):
        q, k, v, extra = inputs.get(i)
        out = fn(q, k, v, extra)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    return time_call(call, cfg.device, budget_s=cfg.cpu_budget_s)


def _record(case: Case, backend: str, pass_name: str, grid: TokenGrid, cfg: BenchConfig, t: Timing, dense: Timing,
            work: float | None, err: float, peak: float | None) -> dict:
    speedup = dense.median / t.median
    return {
        "method": case.method, "backend": backend, "pass": pass_name,
        "B": cfg.batch, "H": cfg.heads, "N": grid.num_tokens, "D": cfg.head_dim,
        "dtype": str(cfg.dtype).removeprefix("torch."), "options": _jsonable(case.options),
        "grid": [grid.frames, grid.height, grid.width, grid.text_tokens, grid.text_position],
        "density": case.density(grid), "ms": t.median, "ms_min": t.minimum, "ms_max": t.maximum,
        "dense_ms": dense.median, "flex_ms": None, "work_fraction": work, "speedup": speedup,
        "efficiency": None if work is None else speedup * work, "peak_mem_mb": peak, "rel_err_dense": err,
    }


def _jsonable(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _runnable_backends(method: str, device: torch.device) -> list[str]:
    return [name for name, b in BACKENDS.items() if b.can_run(method, device)[0]]


def run(cfg: BenchConfig) -> list[dict]:
    """Time every selected case on every backend that can run it here; returns the records."""
    cases = [c for c in DEFAULT_CASES if c.method in cfg.methods]
    passes = ["fwd"] + (["fwd+bwd"] if cfg.backward else [])
    plan = [(g, c, b, p) for g in cfg.grids for p in passes for c in cases for b in _runnable_backends(c.method, cfg.device)]
    progress = Progress(len(plan) + len(cfg.grids) * len(passes))
    records = []
    for grid in cfg.grids:
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            inputs = _make_inputs(cfg, grid.num_tokens, backward)
            progress.update(f"dense sdpa N={grid.num_tokens} {pass_name}")
            dense = _timed(lambda q, k, v, e: F.scaled_dot_product_attention(q, k, v), inputs, backward, cfg)
            progress.step()
            q, k, v, extra = inputs.get(0)
            with torch.no_grad():
                dense_out = F.scaled_dot_product_attention(q, k, v)
            for g, case, backend, p in plan:
                if g != grid or p != pass_name:
                    continue
                progress.update(f"{case.method} {backend} N={grid.num_tokens} {pass_name}")
                fn = lambda q, k, v, e, case=case, backend=backend: case.call(q, k, v, e, grid, backend)
                _reset_peak(cfg.device)
                t = _timed(fn, inputs, backward, cfg)
                peak = _peak_mb(cfg.device)
                with torch.no_grad():
                    err = rel_error(fn(q, k, v, extra), dense_out)
                records.append(_record(case, backend, pass_name, grid, cfg, t, dense, case.work_fraction(grid, cfg.head_dim), err, peak))
                progress.step()
    progress.close()
    return records


def environment(device: torch.device) -> dict:
    """Device and versions for the JSON header."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name, "torch": torch.__version__, "triton": triton_version, "commit": _commit(),
        "threads": torch.get_num_threads(),
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def format_table(records: list[dict]) -> str:
    head = f"{'method':<8} {'backend':<7} {'pass':<8} {'N':>6} {'ms':>9} {'dense ms':>9} {'speedup':>8} {'work':>7} {'effic.':>7} {'rel err':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        work = "-" if r["work_fraction"] is None else f"{r['work_fraction']:.3f}"
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.3f}"
        lines.append(
            f"{r['method']:<8} {r['backend']:<7} {r['pass']:<8} {r['N']:>6} {r['ms']:>9.2f} {r['dense_ms']:>9.2f} "
            f"{r['speedup']:>7.2f}x {work:>7} {eff:>7} {r['rel_err_dense']:>8.2e}"
        )
    return "\n".join(lines)


def write_json(path: Path, device: torch.device, records: list[dict]) -> None:
    payload = {**environment(device), "records": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
