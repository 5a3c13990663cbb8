"""The quality side of ``difattn bench``: each method and setting measured against dense attention
(:mod:`.quality`) on structured DiT-like inputs (:mod:`.inputs`), on q/k/v captured from real models and end to
end, next to its speedup.

- :func:`default_quality`: the plain run's cases on structured inputs of each bench shape, with the speed of the
  matching forward record (cheap: one float64 dense pass per shape).
- :func:`run_quality` (``difattn bench --quality``): a sweep of each method's main knob (:data:`cases.QUALITY_CASES`)
  on structured inputs, each setting timed forward, and the same settings on i.i.d. random q/k/v for contrast;
  the small-grid settings (:data:`cases.SMALL_GRID_CASES`) on
  captured patterns (the trained digits PixelDiT, tiny diffusers models) and end to end.

A quality record (the ``"quality"`` list of the bench JSON; schema also in :mod:`.runner`) is
``{"method", "backend", "options", "inputs", "source", "B", "H", "N", "D", "dtype", "grid", "ms", "dense_ms",
"speedup", "work_fraction", "rel_err_dense", "cos_dense", "worst_head_rel_err", "recall", "worst_head_recall",
"taylor_mass", "taylor_mass_est", "psnr", "ssim", "steps", "dense_steps", "dense_layers"}``; ``inputs`` is
``"random"``, ``"structured"``, ``"captured"`` or ``"pipeline"``, ``source`` says which (generator and seed, model
and layers); ``null`` where a value does not apply (recall of linear attention, PSNR of a single attention call,
speed of captured inputs and pipelines, whose shapes are too small to time meaningfully).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import functional, reference
from ..grid import TokenGrid
from ..testing import random_qkv
from . import baselines, quality
from .cases import CASES, QUALITY_CASES, Case, Shape
from .inputs import structured_qkv
from .progress import Progress
from .runner import REFERENCE_LIMIT, BenchConfig, jsonable, runnable_backends
from .timing import time_call

QUALITY_FIELDS = ("rel_err_dense", "cos_dense", "worst_head_rel_err", "recall", "worst_head_recall", "taylor_mass",
                  "taylor_mass_est", "psnr", "ssim")
_SPEED_FIELDS = ("ms", "dense_ms", "speedup", "work_fraction")
_PIPELINE_FIELDS = ("steps", "dense_steps", "dense_layers")
STRUCTURED_SEED = 0


def method_extra(q: torch.Tensor, k: torch.Tensor) -> tuple:
    """The extra inputs the bench's linear and DyDiLA calls take, made from the attention's own q and k: DyDiLA with
    its auxiliary streams equal to q and k, ``γ = 3`` and ``λ = 0.25`` everywhere (the middle of its banks'
    initial spans); linear attention on LiT's ReLU features ``relu(q)``, ``relu(k)``."""
    B, H, N, _ = q.shape
    gamma = torch.full((B, H, N), 3.0, dtype=q.dtype, device=q.device)
    lam = torch.full((B, H, N), 0.25, dtype=q.dtype, device=q.device)
    return (q, k, gamma, lam, torch.relu(q), torch.relu(k))


def _run(case: Case, q, k, v, extra, grid: TokenGrid, backend: str) -> tuple[torch.Tensor, quality.KeptFn | None, dict]:
    """The case's output on these inputs, the pairs it computes exactly (None for linear methods) and any
    method-specific quality fields."""
    o = case.options
    if case.method == "clear":
        mask = reference.clear_mask(grid, o["radius"], o.get("temporal_radius"), device=q.device)
        return case.call(q, k, v, extra, grid, backend), quality.pair_mask(mask), {}
    if case.method == "grat":
        mask = reference.grat_mask(grid, o.get("group"), o.get("pattern", "neighbors"), o.get("reach", 1), device=q.device)
        return case.call(q, k, v, extra, grid, backend), quality.pair_mask(mask), {}
    if case.method == "pisa":
        out, blocks = functional.pisa_attention(q, k, v, grid=grid, backend=backend, return_blocks=True, **o)
        est = quality.pisa_taylor_mass(q, k, blocks, grid, o["block_size"])
        return out, quality.pisa_kept(blocks, grid, grid.num_tokens, o["block_size"]), {"taylor_mass_est": est}
    if case.method == "llsa":
        out, indices = functional.llsa_attention(q, k, v, grid=grid, backend=backend, return_indices=True, **o)
        return out, quality.llsa_kept(indices, grid, grid.num_tokens, o.get("block_size", 16)), {}
    return case.call(q, k, v, extra, grid, backend), None, {}


def evaluate(runs: list[tuple[Case, str]], grid: TokenGrid, q, k, v) -> list[dict | None]:
    """Quality fields of each ``(case, backend)`` on ``q, k, v`` (``(B, H, N, D)``, ``grid``'s order), one dense
    float64 pass for all; each dict holds every :data:`QUALITY_FIELDS` key. None for a setting these inputs
    cannot take (e.g. an LLSA top-k above the blocks of a small grid)."""
    extra = method_extra(q, k)
    dense = quality.dense_float64(q, k, v)
    results: list[dict | None] = []
    kept = {}
    with torch.no_grad():
        for i, (case, backend) in enumerate(runs):
            try:
                out, kept_fn, fields = _run(case, q, k, v, extra, grid, backend)
            except ValueError:
                results.append(None)
                continue
            results.append({key: None for key in QUALITY_FIELDS} | quality.output_errors(out, dense) | fields)
            if kept_fn is not None:
                kept[i] = kept_fn
        for i, (recall, worst) in quality.recalls(q, k, kept).items():
            results[i] |= {"recall": recall, "worst_head_recall": worst}
            if runs[i][0].method == "pisa":
                results[i]["taylor_mass"] = 1.0 - recall
    return results


def record(case: Case, backend: str, inputs: str, source: str, shape: Shape, dtype: torch.dtype, fields: dict) -> dict:
    """One quality record (schema in the module docstring); absent speed or pipeline fields are null."""
    g = shape.grid
    return {
        "method": case.method, "backend": backend, "options": jsonable(case.options), "inputs": inputs,
        "source": source, "B": shape.batch, "H": shape.heads, "N": g.num_tokens, "D": shape.head_dim,
        "dtype": str(dtype).removeprefix("torch."), "grid": [g.frames, g.height, g.width, g.text_tokens, g.text_position],
        **{key: fields.get(key) for key in (*_SPEED_FIELDS, *QUALITY_FIELDS, *_PIPELINE_FIELDS)},
    }


def _structured(cfg: BenchConfig, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return structured_qkv(shape.grid, batch=shape.batch, heads=shape.heads, head_dim=shape.head_dim,
                          seed=STRUCTURED_SEED, dtype=cfg.dtype, device=cfg.device)


SOURCE = f"structured_qkv(seed={STRUCTURED_SEED})"
RANDOM_SOURCE = "i.i.d. N(0, 1) q, k, v (testing.random_qkv, seed 0)"


def default_quality(cfg: BenchConfig, records: list[dict]) -> list[dict]:
    """The plain run's cases on structured inputs of every shape up to ``REFERENCE_LIMIT`` tokens, each with the
    speed fields of its forward record in ``records``."""
    table = cfg.cases or CASES
    out = []
    for shape in cfg.shapes:
        if shape.grid.num_tokens > REFERENCE_LIMIT:
            continue
        runs = [(c, b) for m in cfg.methods for c in table[m]
                for b in runnable_backends(c.method, cfg.device, cfg.dtype, c.options)]
        q, k, v = _structured(cfg, shape)
        for (case, backend), fields in zip(runs, evaluate(runs, shape.grid, q, k, v)):
            if fields is None:
                continue
            mine = record(case, backend, "structured", SOURCE, shape, cfg.dtype, fields)
            speed = next((r for r in records if r["pass"] == "fwd" and _same_case(r, mine)), {})
            out.append(mine | {key: speed[key] for key in _SPEED_FIELDS if key in speed})
    return out


def _same_case(a: dict, b: dict) -> bool:
    return all(a[key] == b[key] for key in ("method", "backend", "options", "grid", "B", "H", "D", "dtype"))


def _time(fn, cfg: BenchConfig) -> float:
    return time_call(lambda i: fn(), cfg.device, budget_s=cfg.cpu_budget_s).typical


def sweep(cfg: BenchConfig, progress: Progress | None = None) -> list[dict]:
    """:data:`QUALITY_CASES` on structured inputs of each shape (up to ``REFERENCE_LIMIT`` tokens), each setting
    timed forward on its fast backend against dense SDPA."""
    out = []
    for shape in cfg.shapes:
        if shape.grid.num_tokens > REFERENCE_LIMIT:
            continue
        q, k, v = _structured(cfg, shape)
        extra = method_extra(q, k)
        with torch.no_grad():
            dense_ms = min(_time(lambda f=f: f(q, k, v, extra), cfg) for f in baselines.dense_fns(cfg.device).values())
            runs = [(c, runnable_backends(c.method, cfg.device, cfg.dtype, c.options)[0])
                    for m in cfg.methods for c in QUALITY_CASES[m]]
            speeds = []
            for case, backend in runs:
                if progress:
                    progress.update(f"sweep {case.method} {json.dumps(jsonable(case.options))}")
                try:
                    ms = _time(lambda: case.call(q, k, v, extra, shape.grid, backend), cfg)
                except ValueError:  # a setting this shape cannot take
                    ms = None
                speeds.append(None if ms is None else {"ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms,
                                                       "work_fraction": case.needed_fraction(shape)})
                if progress:
                    progress.step()
        runs, speeds = [r for r, s in zip(runs, speeds) if s], [s for s in speeds if s]
        for (case, backend), speed, fields in zip(runs, speeds, evaluate(runs, shape.grid, q, k, v)):
            out.append(record(case, backend, "structured", SOURCE, shape, cfg.dtype, fields | speed))
        # The same settings on i.i.d. Gaussian q, k, v (the inputs the speed records' error is measured on).
        noise = random_qkv(shape.batch, shape.heads, shape.grid.num_tokens, shape.head_dim, dtype=cfg.dtype,
                           device=cfg.device)
        for (case, backend), speed, fields in zip(runs, speeds, evaluate(runs, shape.grid, *noise)):
            out.append(record(case, backend, "random", RANDOM_SOURCE, shape, cfg.dtype, fields | speed))
    return out


def run_quality(cfg: BenchConfig, *, digits_weights: Path | None) -> list[dict]:
    """``difattn bench --quality``: :func:`sweep`, then captured patterns and end-to-end samples (the trained
    digits PixelDiT when ``digits_weights`` exists, tiny diffusers models when diffusers is installed)."""
    from . import digits, pipelines

    steps = sum(len(QUALITY_CASES[m]) for m in cfg.methods) * sum(s.grid.num_tokens <= REFERENCE_LIMIT for s in cfg.shapes)
    progress = Progress(steps + 2)
    out = sweep(cfg, progress)
    progress.update("digits PixelDiT")
    if digits_weights is not None and digits_weights.exists():
        out += digits.quality_records(digits_weights, cfg.methods)
    progress.step()
    progress.update("tiny diffusers models")
    out += pipelines.quality_records(cfg.methods)
    progress.step()
    progress.close()
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_quality_table(records: list[dict]) -> str:
    """The quality records as a text table (speedup, errors against float64 dense, recall, PSNR)."""
    head = (f"{'method':<7} {'options':<44} {'inputs':<10} {'shape':>12} {'speedup':>8} {'rel err':>9} {'cos':>8} "
            f"{'worst hd':>9} {'recall':>7} {'psnr':>6}")
    lines = [head, "-" * len(head)]
    for r in records:
        f, h, w, t, _ = r["grid"]
        shape = (f"{f}x" if f > 1 else "") + f"{h}x{w}" + (f"+{t}" if t else "")
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        if r.get("dense_steps") or r.get("dense_layers"):
            options += f"; dense steps {r['dense_steps']}, layers {r['dense_layers']}"
        lines.append(
            f"{r['method']:<7} {options[:44]:<44} {r['inputs']:<10} {shape:>12} {_fmt(r['speedup'], '7.2f'):>7}x "
            f"{r['rel_err_dense']:>9.2e} {r['cos_dense']:>8.5f} {_fmt(r['worst_head_rel_err'], '9.2e'):>9} "
            f"{_fmt(r['recall'], '7.3f'):>7} {_fmt(r['psnr'], '6.1f'):>6}"
        )
    return "\n".join(lines)


def pareto_plot(records: list[dict], path: Path, title: str = "") -> bool:
    """Speedup against relative error (left) and against recall (right), one curve per method through its settings
    on structured inputs (PISA's zeroth order dashed beside its hybrid curve), the legend outside the axes; settings
    timed on the torch reference are left out when a compiled backend ran others. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    timed = [r for r in records if r["inputs"] == "structured" and r.get("speedup") is not None]
    if any(r.get("backend") != "torch" for r in timed):
        timed = [r for r in timed if r.get("backend") != "torch"]
    points: dict[tuple[str, str], list[dict]] = {}
    for r in timed:
        variant = r["options"].get("order", "hybrid") if r["method"] == "pisa" else ""
        points.setdefault((r["method"], "" if variant == "hybrid" else variant), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors: dict[str, str] = {}
    for (method, variant), recs in sorted(points.items()):
        recs = sorted(recs, key=lambda r: r["speedup"])
        style = {"marker": "o", "linestyle": "--" if variant else "-", "color": colors.get(method)}
        (line,) = axes[0].plot([r["speedup"] for r in recs], [r["rel_err_dense"] for r in recs],
                               label=f"{method} ({variant})" if variant else method, **style)
        colors.setdefault(method, line.get_color())
        with_recall = [r for r in recs if r["recall"] is not None]
        if with_recall:
            axes[1].plot([r["speedup"] for r in with_recall], [r["recall"] for r in with_recall],
                         **{**style, "color": line.get_color()})
    axes[0].set(xscale="log", yscale="log", xlabel="speedup over dense SDPA", ylabel="relative L2 error vs float64 dense")
    axes[1].set(xscale="log", xlabel="speedup over dense SDPA", ylabel="softmax-mass recall (exact pairs)", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    fig.legend(loc="center left", bbox_to_anchor=(0.83, 0.5), title="method")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
