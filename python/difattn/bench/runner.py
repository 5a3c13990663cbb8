"""Runs the benchmark: every case on every backend that can run it here, against dense SDPA (and FlexAttention
with the same mask, in raster and in tile order, where the method has a mask), with a progress bar.

JSON schema (stable): ``{"device", "cpu", "torch", "triton", "commit", "threads", "matmul_gflops", "records":
[record, ...], "quality": [quality record, ...]}`` (``cpu``: the CPU's model name, family, model, ISA extensions and logical CPUs, see
:func:`cpu_description`; ``matmul_gflops``: the device's square-matmul rate in the bench dtype, the ceiling to read
dense SDPA's rate against); a record is
``{"method", "backend", "pass" ("fwd" | "fwd+bwd"), "B", "H", "N", "D", "dtype", "options", "grid", "density",
"ms", "ms_min", "ms_max", "dense_ms", "dense_flash_ms", "dense_cudnn_ms", "flex_ms", "flex_tiled_ms", "natten_ms",
"fla_ms", "drop_ms", "work_fraction", "computed_fraction", "speedup", "efficiency", "computed_efficiency",
"peak_mem_mb", "rel_err_dense", "rel_err_ref", "rel_err_drop"}``.
Every ``*_ms`` is a typical time per call (CPU: the fastest of at least five repeats, as other work on a shared
host only ever adds time; CUDA: the median of ``triton.testing.do_bench``), ``ms_min`` and ``ms_max`` the extremes.
``dense_ms`` is the fastest dense SDPA measured (CPU: torch's flash kernel; CUDA: the faster of the flash and cuDNN
backends, each also recorded); ``speedup = dense_ms / ms``; ``efficiency = speedup * work_fraction`` (FLOP rate on
the work the method must do, as a fraction of the dense kernel's); ``computed_efficiency = speedup *
computed_fraction`` (on the work the kernels actually do). Baselines (:mod:`.baselines`): FlexAttention with the
method's mask (``flex_ms`` raster order, ``flex_tiled_ms`` tile order; on CUDA, or on CPU with ``flex``), NATTEN
for CLEAR and flash-linear-attention for linear attention when installed, and for PISA the keep-or-drop
block-sparse attention over the same selected blocks (``drop_ms`` through FlexAttention, ``rel_err_drop`` its error
against dense). ``null`` where a value does not apply or was not measured. ``rel_err_dense`` of a speed record is
measured on the timed inputs, i.i.d. Gaussian q, k, v, where softmax attention is nearly flat: it says how a
method treats noise, not how it treats a model's attention (tables label it "random q/k/v").

A quality record (:mod:`.quality_suite`) measures one method and setting against float64 dense attention on
structured DiT-like inputs (:mod:`.inputs`), on q/k/v captured from a model, or end to end:
``{"method", "backend", "options", "inputs" ("random" | "structured" | "captured" | "pipeline"), "source", "B", "H",
"N", "D", "dtype", "grid", "ms", "dense_ms", "speedup", "work_fraction", "rel_err_dense", "cos_dense",
"worst_head_rel_err", "recall", "worst_head_recall", "taylor_mass", "taylor_mass_est", "psnr", "ssim", "steps",
"dense_steps", "dense_layers"}`` (metrics defined in :mod:`.quality`; speed fields are the forward times of the
same setting and shape, ``null`` for captured and pipeline records; ``recall`` is ``null`` for linear attention
and DyDiLA, ``psnr``/``ssim`` and the step fields only on pipeline records). The plain run adds the quality of its
own cases on structured inputs; ``difattn bench --quality`` runs the sweep of :data:`.cases.QUALITY_CASES`,
captured patterns and end-to-end models instead of the speed cases.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backends import BACKENDS
from ..testing import rel_error
from . import baselines
from .cases import CASES, Case, Shape
from .progress import Progress
from .timing import Timing, time_call

_ROTATIONS = 3  # distinct input sets cycled through while timing
REFERENCE_LIMIT = 8192  # compare with the torch reference up to this many tokens
_BASELINE_KEYS = ("dense_ms", "dense_flash_ms", "dense_cudnn_ms", "flex_ms", "flex_tiled_ms", "natten_ms", "fla_ms",
                  "drop_ms")


@dataclass
class BenchConfig:
    device: torch.device
    shapes: tuple[Shape, ...]
    dtype: torch.dtype = torch.float32
    backward: bool = False
    methods: tuple[str, ...] = tuple(CASES)
    cases: dict | None = None
    flex: bool = False
    cpu_budget_s: float = 1.0


def _make_inputs(cfg: BenchConfig, shape: Shape, requires_grad: bool) -> list:
    gen = torch.Generator().manual_seed(0)
    dims = (shape.batch, shape.heads, shape.grid.num_tokens, shape.head_dim)

    def rand(*s, low=None, high=None):
        x = torch.randn(*s, generator=gen) if low is None else low + (high - low) * torch.rand(*s, generator=gen)
        return x.to(device=cfg.device, dtype=cfg.dtype).requires_grad_(requires_grad and low is None)

    sets = []
    for _ in range(_ROTATIONS):
        q, k, v = rand(*dims), rand(*dims), rand(*dims)
        # DyDiLA's aux streams, exponents and lambdas; then non-negative features for plain linear attention.
        extra = (rand(*dims), rand(*dims), rand(*dims[:3], low=1.0, high=3.0), rand(*dims[:3], low=0.0, high=0.25),
                 *(torch.rand(*dims, generator=gen).to(device=cfg.device, dtype=cfg.dtype).requires_grad_(requires_grad)
                   for _ in range(2)))
        sets.append((q, k, v, extra))
    return sets


def _timed(fn, inputs: list, backward: bool, cfg: BenchConfig) -> Timing:
    """Times ``fn`` (and its backward). The output gradients are made once, and the inputs' ``.grad`` are cleared
    before each call, so the time is the op's alone: no gradient accumulation into old buffers, no fill."""
    leaves = [[t for t in (q, k, v, *extra) if t.requires_grad] for q, k, v, extra in inputs]
    grad_outs = [torch.ones_like(v) for _, _, v, _ in inputs]  # outputs are (B, H, N, Dv) in the inputs' dtype

    def call(i: int):
        j = i % len(inputs)
        q, k, v, extra = inputs[j]
        if backward:
            for t in leaves[j]:
                t.grad = None
        out = fn(q, k, v, extra)
        if backward:
            out.backward(grad_outs[j] if out.shape == grad_outs[j].shape else torch.ones_like(out))
        return out

    return time_call(call, cfg.device, budget_s=cfg.cpu_budget_s)


def _time_each(fns: dict, inputs: list, backward: bool, cfg: BenchConfig) -> dict[str, float | None]:
    """Typical ms of each baseline; ``None`` for one that cannot run these inputs (unsupported dtype or shape)."""
    out = {}
    for key, fn in fns.items():
        try:
            out[key] = _timed(fn, inputs, backward, cfg).typical
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            out[key] = None
    return out


def _baselines(cfg: BenchConfig, case: Case, shape: Shape, inputs: list, backward: bool, dense_out) -> dict:
    """Times (and PISA's keep-or-drop error) of every baseline that applies to this case here."""
    fns = {**baselines.natten_fns(case, shape, cfg.device), **baselines.fla_fns(case, cfg.device)}
    flex_here = cfg.flex or cfg.device.type == "cuda"
    if flex_here:
        fns.update(baselines.flex_fns(case, shape, cfg.device))
    extra = {}
    if case.method == "pisa":
        q, k, v, _ = inputs[0]
        with torch.no_grad():
            token_block, selected = baselines.pisa_keep_only(case, shape, q, k, v, runnable_backends("pisa", cfg.device)[0])
        if shape.grid.num_tokens <= REFERENCE_LIMIT:
            extra["rel_err_drop"] = baselines.keep_only_error(q, k, v, token_block, selected, dense_out)
        if flex_here:
            fns.update(baselines.keep_only_flex(token_block, selected, shape.grid.num_tokens, cfg.device))
    return {**_time_each(fns, inputs, backward, cfg), **extra}


def runnable_backends(method: str, device: torch.device, dtype: torch.dtype | None = None,
                      options: dict | None = None) -> list[str]:
    """Fast backends that can run ``method`` here (for ``dtype`` and ``options`` when given); the torch reference
    only when there is none. Triton counts only on CUDA (its CPU interpreter is a test tool, not something to time)."""
    fast = [
        name for name, b in BACKENDS.items()
        if name != "torch" and (name != "triton" or device.type == "cuda") and b.can_run(method, device, dtype, options)[0]
    ]
    return fast or ["torch"]


def run(cfg: BenchConfig) -> list[dict]:
    """Time every selected case on every backend that can run it here; returns the records."""
    table = cfg.cases or CASES
    cases = [c for m in cfg.methods for c in table[m]]
    passes = ["fwd"] + (["fwd+bwd"] if cfg.backward else [])
    steps = [(s, p, c, b) for s in cfg.shapes for p in passes for c in cases for b in runnable_backends(c.method, cfg.device)]
    progress = Progress(len(steps))
    records = []
    for shape in cfg.shapes:
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            inputs = _make_inputs(cfg, shape, backward)
            dense = _time_each(baselines.dense_fns(cfg.device), inputs, backward, cfg)
            measured = [t for t in dense.values() if t is not None]
            if not measured:
                raise RuntimeError(f"no dense SDPA backend ran on {cfg.device} for {shape.label}")
            dense["dense_ms"] = min(measured)
            q, k, v, extra = inputs[0]
            with torch.no_grad():
                dense_out = F.scaled_dot_product_attention(q, k, v)
            for case in cases:
                compared = _baselines(cfg, case, shape, inputs, backward, dense_out)
                reference = None
                if shape.grid.num_tokens <= REFERENCE_LIMIT:
                    with torch.no_grad():
                        reference = case.reference(q, k, v, extra, shape.grid)
                for backend in runnable_backends(case.method, cfg.device):
                    if (shape, pass_name, case, backend) not in steps:
                        continue
                    progress.update(f"{case.method} {backend} {shape.label} {pass_name}")
                    records.append(_measure(cfg, shape, pass_name, case, backend, inputs, {**dense, **compared}, dense_out,
                                            reference))
                    progress.step()
    progress.close()
    return records


def _measure(cfg, shape, pass_name, case, backend, inputs, baseline: dict, dense_out, reference) -> dict:
    fn = lambda q, k, v, e: case.call(q, k, v, e, shape.grid, backend)  # noqa: E731
    if cfg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(cfg.device)
    t = _timed(fn, inputs, pass_name == "fwd+bwd", cfg)
    peak = torch.cuda.max_memory_allocated(cfg.device) / 2**20 if cfg.device.type == "cuda" else None
    q, k, v, extra = inputs[0]
    with torch.no_grad():
        out = fn(q, k, v, extra)
    backward = pass_name == "fwd+bwd"
    needed, computed = case.needed_fraction(shape, backward), case.computed_fraction(shape, backend, backward)
    speedup = baseline["dense_ms"] / t.typical
    return {
        "method": case.method, "backend": backend, "pass": pass_name,
        "B": shape.batch, "H": shape.heads, "N": shape.grid.num_tokens, "D": shape.head_dim,
        "dtype": str(cfg.dtype).removeprefix("torch."), "options": jsonable(case.options),
        "grid": [shape.grid.frames, shape.grid.height, shape.grid.width, shape.grid.text_tokens, shape.grid.text_position],
        "density": case.density(shape), "ms": t.typical, "ms_min": t.minimum, "ms_max": t.maximum,
        **{key: baseline.get(key) for key in _BASELINE_KEYS},
        "work_fraction": needed, "computed_fraction": computed, "speedup": speedup,
        "efficiency": speedup * needed, "computed_efficiency": speedup * computed, "peak_mem_mb": peak,
        "rel_err_dense": rel_error(out, dense_out),
        "rel_err_ref": None if reference is None else rel_error(out, reference),
        "rel_err_drop": baseline.get("rel_err_drop"),
    }


def jsonable(options: dict) -> dict:
    """Options as JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, versions and the matmul ceiling for the JSON header."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = cpu_description()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu['model_name']})"
    return {
        "device": name, "cpu": cpu, "torch": torch.__version__, "triton": triton_version, "commit": _commit(),
        "threads": torch.get_num_threads(), "matmul_gflops": baselines.matmul_gflops(device, dtype),
    }


# The x86 ISA extensions the CPU kernels and torch's CPU kernels can use, as /proc/cpuinfo names them.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict:
    """``{"model_name", "family", "model", "isa": [...], "logical_cpus"}`` of this machine's CPU, from
    /proc/cpuinfo (the model name alone does not tell an AVX2-only EPYC from an AVX-512 one)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name", "unknown"),
        "family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "isa": [flag for flag in _ISA_FLAGS if flag in flags],
        "logical_cpus": os.cpu_count(),
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def options_label(options: dict) -> str:
    """``radius=8.0, group=8x8``: a case's options as the table and the plot show them."""
    return ", ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in options.items())


def format_table(records: list[dict]) -> str:
    width = max([len("options")] + [len(options_label(r["options"])) for r in records])
    head = (f"{'method':<7} {'options':<{width}} {'backend':<7} {'pass':<7} {'shape':>14} {'ms':>9} {'dense':>9} "
            f"{'flex':>9} {'speedup':>8} {'work':>6} {'effic.':>6} {'c.eff.':>6} {'err/rand':>9} {'err/ref':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        f, h, w, t, _ = r["grid"]
        shape = f"{f}x{h}x{w}" if f > 1 else f"{h}x{w}"
        shape += f"+{t}" if t else ""
        lines.append(
            f"{r['method']:<7} {options_label(r['options']):<{width}} {r['backend']:<7} {r['pass']:<7} {shape:>14} "
            f"{r['ms']:>9.2f} {r['dense_ms']:>9.2f} {_fmt(r['flex_ms'], '9.2f'):>9} {r['speedup']:>7.2f}x "
            f"{r['work_fraction']:>6.3f} {r['efficiency']:>6.2f} {r['computed_efficiency']:>6.2f} "
            f"{r['rel_err_dense']:>9.2e} {_fmt(r['rel_err_ref'], '8.1e'):>8}"
        )
    return "\n".join(lines)


def write_json(path: Path, device: torch.device, dtype: torch.dtype, records: list[dict],
               quality: list[dict] | None = None) -> None:
    payload = {**environment(device, dtype), "records": records, "quality": quality or []}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def plot(records: list[dict], path: Path) -> bool:
    """Speedup over dense against tokens, one line per (method, options, backend, pass), the legend outside the
    axes; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in records:
        key = (r["method"], options_label(r["options"]), r["backend"], r["pass"])
        series.setdefault(key, []).append((r["N"], r["speedup"]))
    for (method, options, backend, pass_name), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{method} ({options}) {backend} {pass_name}")
    ax.axhline(1.0, color="gray", lw=0.8, label="dense SDPA")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("speedup over dense SDPA")
    times = FuncFormatter(lambda y, _: f"{y:g}×")  # 2×, 0.5× rather than 2×10⁰
    ax.yaxis.set_major_formatter(times)
    ax.yaxis.set_minor_formatter(times)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # outside the data
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
