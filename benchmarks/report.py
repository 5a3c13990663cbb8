"""Generates BENCHMARKS.md and the README's performance table from the committed raw results.

    python benchmarks/report.py            # rewrite BENCHMARKS.md and the README table
    python benchmarks/report.py --check    # exit 1 if either is out of date

Every number in those files comes from a JSON file under benchmarks/results/ written by `difattn bench --json`.
Files named `<series>-run<k>.json` are repeated runs of one series (on a shared host one run can be slowed by
others' work): the README shows, per case, the median over the runs, and BENCHMARKS.md every run and a summary.
Files of `difattn bench --world-size P` (``"kind": "distributed"``) fill the sequence-parallelism tables instead:
bytes per rank and time per layer of each scheme, measured and (at sizes that cannot run here) counted; files of
`difattn bench --static` (``"kind": "static"``) the table of compiled kernels (registers, spills, shared memory,
tensor-core instructions of every production launch, read from the binaries without a GPU).
A file with quality records (`difattn bench --quality`) also gets a quality section in BENCHMARKS.md and a Pareto
plot next to it, `<name>-pareto.png` (drawn by `difattn.bench.quality_suite.pareto_plot`, so rewriting needs
difattn importable and matplotlib; `--check` only checks that the plot exists).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README_START, README_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
SCALING_START, SCALING_END = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"
RUN_NAME = re.compile(r"^(?P<series>.+)-run(?P<run>\d+)$")


def _shape(r: dict) -> str:
    frames, height, width, text, position = r["grid"]
    label = f"{frames}x{height}x{width}" if frames > 1 else f"{height}x{width}"
    return label + (f"+{text} text {position}" if text else "")


def _num(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _options(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["options"].items())


def _baselines(r: dict) -> str:
    """Every baseline time recorded besides dense: FlexAttention (raster / tiled), NATTEN, fla, keep-or-drop."""
    parts = []
    if r.get("flex_ms") is not None or r.get("flex_tiled_ms") is not None:
        parts.append(f"flex {_num(r.get('flex_ms'), '.2f')} / {_num(r.get('flex_tiled_ms'), '.2f')}")
    for key, name in (("natten_ms", "NATTEN"), ("fla_ms", "fla"), ("drop_ms", "drop")):
        if r.get(key) is not None:
            parts.append(f"{name} {r[key]:.2f}")
    return "; ".join(parts) or "–"


def _dense(r: dict) -> str:
    split = [f"{name} {r[key]:.2f}" for key, name in (("dense_flash_ms", "flash"), ("dense_cudnn_ms", "cuDNN"))
             if r.get(key) is not None]
    return f"{r['dense_ms']:.2f}" + (f" ({', '.join(split)})" if split else "")


def _dense_rate(r: dict, matmul_gflops: float | None) -> str:
    """Dense SDPA's FLOP rate (``4·B·H·N²·D``, ×3.5 with the backward) and its share of the matmul ceiling."""
    flops = 4 * r["B"] * r["H"] * r["N"] ** 2 * r["D"] * (3.5 if r["pass"] == "fwd+bwd" else 1.0)
    rate = flops / (r["dense_ms"] * 1e6)
    return f"{rate:.1f}" + (f" ({rate / matmul_gflops:.0%})" if matmul_gflops else "")


def table(records: list[dict], matmul_gflops: float | None = None) -> list[str]:
    lines = [
        "| method | options | backend | pass | shape | B×H×D | ms (min–max) | dense ms | dense GFLOP/s (of matmul) | "
        "other baselines, ms | speedup | needed work | efficiency (needed / computed) | "
        "rel. err vs dense, random q/k/v (keep-or-drop) | vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        drop = f" ({r['rel_err_drop']:.2e})" if r.get("rel_err_drop") is not None else ""
        lines.append(
            f"| {r['method']} | {_options(r)} | {r['backend']} | {r['pass']} | {_shape(r)} | {r['B']}×{r['H']}×{r['D']} | "
            f"{r['ms']:.2f} ({r['ms_min']:.2f}–{r['ms_max']:.2f}) | {_dense(r)} | {_dense_rate(r, matmul_gflops)} | "
            f"{_baselines(r)} | {r['speedup']:.2f}× | "
            f"{r['work_fraction']:.4f} | {r['efficiency']:.2f} / {_num(r.get('computed_efficiency'), '.2f')} | "
            f"{r['rel_err_dense']:.2e}{drop} | {_num(r.get('rel_err_ref'), '.1e')} |"
        )
    return lines


def _load() -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]


def series(results: list[tuple[Path, dict]]) -> list[tuple[str, list[tuple[Path, dict]]]]:
    """Result files grouped by series: ``<series>-run<k>`` files share one (in run order), any other file is a
    series of one run."""
    groups: dict[str, list[tuple[int, Path, dict]]] = {}
    for path, data in results:
        match = RUN_NAME.match(path.stem)
        name, run = (match["series"], int(match["run"])) if match else (path.stem, 0)
        groups.setdefault(name, []).append((run, path, data))
    return [(name, [(p, d) for _, p, d in sorted(runs, key=lambda x: x[0])]) for name, runs in groups.items()]


def _case(r: dict) -> tuple:
    return (r["method"], r["backend"], r["pass"], json.dumps(r["options"], sort_keys=True), json.dumps(r["grid"]),
            r["B"], r["H"], r["D"], r["dtype"])


def per_case(runs: list[dict]) -> list[list[dict]]:
    """The records of every case across ``runs`` (JSON documents), in the first run's order; a case missing from a
    run is left out of that run."""
    cases: dict[tuple, list[dict]] = {}
    for data in runs:
        for r in data["records"]:
            cases.setdefault(_case(r), []).append(r)
    return list(cases.values())


def _medians(recs: list[dict]) -> dict[str, float]:
    """The medians over one case's records of its ms, dense ms, speedup and efficiency."""
    return {key: statistics.median(x[key] for x in recs) for key in ("ms", "dense_ms", "speedup", "efficiency")}


def summary_table(runs: list[dict]) -> list[str]:
    """Per case: the efficiency on needed work in each run and the medians over the runs."""
    lines = [
        "| method | options | backend | pass | shape | efficiency in each run | median efficiency | median ms | "
        "median dense ms | median speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recs in per_case(runs):
        r = recs[0]
        med = _medians(recs)
        each = ", ".join(format(x["efficiency"], ".2f") for x in recs)
        lines.append(
            f"| {r['method']} | {_options(r)} | {r['backend']} | {r['pass']} | {_shape(r)} | "
            f"{each} | {med['efficiency']:.2f} | {med['ms']:.2f} | "
            f"{med['dense_ms']:.2f} | {med['speedup']:.2f}× |"
        )
    return lines


def is_distributed(data: dict) -> bool:
    return data.get("kind") == "distributed"


def is_static(data: dict) -> bool:
    return data.get("kind") == "static"


def is_interleaved(data: dict) -> bool:
    return data.get("kind") == "interleaved"


def interleaved_md(results: list[tuple[Path, dict]]) -> list[str]:
    """One table per ``difattn bench --interleaved`` file: attention alone and between two torch Linear layers."""
    out = ["## Attention between torch ops (`difattn bench --interleaved`)", "",
           "Each method's attention timed alone and right after a torch Linear layer (`Linear(H·D → 3·H·D) →",
           "attention → Linear(H·D → H·D)`, as in a DiT block; the same q/k/v, forward), the fastest repeat of each;",
           "*ratio*: in chain / alone (the median ratio: of the medians). *threads*: torch's thread count and the",
           "runtime of the Rust kernels' loops (`openmp`: torch's own threads; `rayon`: the core's pool).", ""]
    for path, data in results:
        out += [f"### {path.stem}", "", f"Device: {data['device']}; torch {data['torch']}; commit `{data['commit']}`.", "",
                "| method | options | backend | shape | alone ms | in chain ms | ratio | median ratio | threads |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in data["records"]:
            threads = f"{r['threads']} {r['cpu_threads']}" if r["backend"] == "rust" and r["cpu_threads"] else r["threads"]
            out.append(f"| {r['method']} | {_options(r)} | {r['backend']} | {_shape(r)} | {r['alone_ms']:.2f} | "
                       f"{r['in_chain_ms']:.2f} | {r['ratio']:.2f}× | {r['median_ratio']:.2f}× | {threads} |")
        out.append("")
    return out


def static_md(results: list[tuple[Path, dict]]) -> list[str]:
    """One table per ``difattn bench --static`` file: every production launch's binary (the file's columns)."""
    out = ["## Compiled kernels (`difattn bench --static`)", "",
           "Every production Triton launch compiled ahead of time as a GPU launch compiles it (triton's own",
           "specialisation of the real arguments), read from the binary without a GPU: registers per thread, bytes",
           "spilled to local memory, shared memory per block, resident warps per SM as a share of the most an SM",
           "holds, wgmma (HGMMA) and mma.sync (HMMA) instructions, and the instructions of the longest loop. These",
           "say how a kernel compiles, not how fast it runs: GPU times are measured separately.", ""]
    for path, data in results:
        columns = data["columns"]
        out += [f"### {path.stem}", "", f"triton {data['triton']}, {data.get('ptxas') or 'ptxas ?'}; commit "
                f"`{data['commit']}`.", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in data["records"]:
            cells = [f"{r[c]:.0%}" if c == "occupancy" else str(r[c]) for c in columns]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def _mb(values: list[int]) -> str:
    """Most bytes any rank moved, in MB (and the least, when the ranks differ)."""
    hi, lo = max(values) / 1e6, min(values) / 1e6
    return f"{hi:.3f}" if hi == lo else f"{hi:.3f} ({lo:.3f})"


def scaling_table(records: list[dict], *, measured: bool) -> list[str]:
    """One row per scheme: forward bytes sent per rank (most, least), and for measured runs the time per layer."""
    head = "| method | scheme | options | pass | shape | B×H×D | dtype | ranks | MB sent per rank (fewest) | "
    head += "ms per layer (slowest rank; fastest of repeats) |" if measured else "all-reduce payload MB |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        last = f"{r['ms']:.2f}" if measured else _mb(r["payload_bytes"]) if r["scheme"] == "state" else "–"
        lines.append(f"| {r['method']} | {r['scheme']} | {_options(r)} | {r['pass']} | {_shape(r)} | "
                     f"{r['B']}×{r['H']}×{r['D']} | {r['dtype']} | {r['world_size']} | {_mb(r['sent_bytes'])} | "
                     f"{last} |")
    return lines


def scaling_md(results: list[tuple[Path, dict]]) -> list[str]:
    out = ["## Sequence parallelism (`difattn bench --world-size P`)", "",
           "Bytes each rank sends in one layer's forward pass, counted at the collectives (all-to-all: the pieces for",
           "other ranks; all-reduce: the ring algorithm's 2(P−1)/P of the payload; the backward mirrors them), and",
           "the time per layer. *Counted, not measured* rows run the same scheme code on `meta` tensors for every",
           "rank of a size that cannot run here.", ""]
    for path, data in results:
        out += [f"### {path.stem}", "",
                f"Device: {data['device']}, {data['world_size']} processes ({data['backend']}, "
                f"{data.get('threads_per_rank', '?')} threads each); torch {data['torch']}; commit `{data['commit']}`.",
                "", *scaling_table(data["records"], measured=True), "",
                "Counted, not measured:", "", *scaling_table(data["computed"], measured=False), ""]
    return out


def scaling_readme(results: list[tuple[Path, dict]]) -> str:
    if not results:
        return "No sequence-parallel results are committed yet."
    lines = []
    for path, data in results:
        lines += [f"**{path.stem}** — {data['device']}, {data['world_size']} {data['backend']} processes (forward; "
                  "full tables in BENCHMARKS.md):", "",
                  *scaling_table([r for r in data["records"] if r["pass"] == "fwd"], measured=True), "",
                  "Counted on `meta` tensors, not measured:", "", *scaling_table(data["computed"], measured=False), ""]
    return "\n".join(lines).rstrip()


def _grid_shape(r: dict) -> str:
    return f"{_shape(r)}, {r['B']}×{r['H']}×{r['D']}"


def _recall(r: dict) -> str:
    if r.get("recall") is None:
        return "–"
    return f"{r['recall']:.3f} ({r['worst_head_recall']:.3f})"


def _taylor(r: dict) -> str:
    if r.get("taylor_mass") is None:
        return "–"
    return f"{r['taylor_mass']:.3f} / {r['taylor_mass_est']:.3f}"


def _schedule(r: dict) -> str:
    layers = ", ".join(map(str, r.get("dense_layers") or [])) or "–"
    return f"{r.get('dense_steps') or 0} of {r['steps']} | {layers}"


def quality_tables(records: list[dict]) -> list[str]:
    """The quality records by inputs: structured (with speed), captured (by source), pipeline (by source)."""
    out = []
    timed = [r for r in records if r["inputs"] in ("structured", "random")]
    for inputs, shape in dict.fromkeys((r["inputs"], _grid_shape(r)) for r in timed):
        recs = [r for r in timed if (r["inputs"], _grid_shape(r)) == (inputs, shape)]
        out += [f"#### {inputs.capitalize()} inputs, {shape} ({recs[0]['source']})", "",
                "| method | options | backend | ms | dense ms | speedup | needed work | rel. L2 err | cos | "
                "worst head err | recall (worst head) | Taylor mass: dense / PISA |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            out.append(f"| {r['method']} | {_options(r)} | {r['backend']} | {_num(r['ms'], '.2f')} | "
                       f"{_num(r['dense_ms'], '.2f')} | {_num(r['speedup'], '.2f')}× | {_num(r['work_fraction'], '.4f')} | "
                       f"{r['rel_err_dense']:.3e} | {r['cos_dense']:.5f} | {r['worst_head_rel_err']:.3e} | "
                       f"{_recall(r)} | {_taylor(r)} |")
        out.append("")
    captured = [r for r in records if r["inputs"] == "captured"]
    for source in dict.fromkeys(r["source"] for r in captured):
        recs = [r for r in captured if r["source"] == source]
        out += [f"#### Captured: {source} ({_grid_shape(recs[0])})", "",
                "| method | options | rel. L2 err | cos | worst head err | recall (worst head) | "
                "Taylor mass: dense / PISA |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['method']} | {_options(r)} | {r['rel_err_dense']:.3e} | {r['cos_dense']:.5f} | "
                f"{r['worst_head_rel_err']:.3e} | {_recall(r)} | {_taylor(r)} |" for r in recs]
        out.append("")
    pipeline = [r for r in records if r["inputs"] == "pipeline"]
    for source in dict.fromkeys(r["source"] for r in pipeline):
        recs = [r for r in pipeline if r["source"] == source]
        out += [f"#### End to end: {source} ({_shape(recs[0])})", "",
                "| method | options | dense steps | dense layers | PSNR dB | SSIM | rel. L2 err |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['method']} | {_options(r)} | {_schedule(r)} | {_num(r['psnr'], '.2f')} | "
                f"{_num(r['ssim'], '.4f')} | {r['rel_err_dense']:.3e} |" for r in recs]
        out.append("")
    return out


QUALITY_INTRO = [
    "Each method and setting against float64 dense attention on the same q, k, v: relative L2 error and cosine of",
    "the output, the worst (batch, head), and the softmax-mass recall: the share of dense attention probability on",
    "the (query, key) pairs the method computes exactly (CLEAR's and GRAT's masks, PISA's selected blocks, LLSA's",
    "selected fine blocks; mean over queries, worst head in parentheses; none for linear attention and DyDiLA). For",
    "PISA, the Taylor part: the dense mass on the blocks it approximates and the share its own softmax gives them.",
    "*Structured* inputs are DiT-like (`difattn.bench.inputs`: local, axial and segment heads with random-frequency",
    "RoPE over smooth random fields, sinks, text); *random* ones are the i.i.d. Gaussian q, k, v of the speed runs;",
    "*captured* ones come from the trained digits PixelDiT and from tiny diffusers models trained 100 steps on",
    "smooth random latents; *end to end* compares the final sample (images for the digits PixelDiT,",
    "latents for the diffusers models) with the dense run's from the same noise and steps (PSNR over the dense",
    "sample's range, SSIM). Linear attention is LiT's ReLU-feature form on the same q, k; DyDiLA uses q, k as its",
    "auxiliary streams with γ = 3, λ = 0.25 (neither approximates softmax attention, as trained models adapt to them).",
]


def pareto_path(path: Path) -> Path:
    return path.with_name(path.stem + "-pareto.png")


def quality_md(path: Path, data: dict) -> list[str]:
    plot = pareto_path(path)
    return [
        f"## Quality: {path.stem}", "",
        f"Device: {data['device']}; torch {data['torch']}, {data.get('threads', '?')} threads; commit `{data['commit']}`.",
        "Speed numbers here come from the same run as the quality numbers; on a shared CPU they are noisy (the speed",
        "series above are the reference).", "",
        *QUALITY_INTRO, "",
        f"![speedup against error and recall]({plot.relative_to(ROOT).as_posix()})", "",
        *quality_tables(data["quality"]),
    ]


def benchmarks_md(results: list[tuple[Path, dict]]) -> str:
    out = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from the raw JSON in `benchmarks/results/` (written by",
        "`difattn bench --json`); do not edit by hand. FLOP model: dense forward `4·B·H·N²·D`, backward 2.5× forward.",
        "*needed work*: the fraction of dense FLOPs the method must do; *efficiency*: speedup × needed work (the",
        "method's FLOP rate on that work as a fraction of the dense kernel's), and the same on the work its kernels",
        "compute (whole blocks). Baselines: FlexAttention with the method's mask in raster and in tile order, NATTEN",
        "(CLEAR's bounding square window) and flash-linear-attention (causal chunked kernel) when installed, and for",
        "PISA the keep-or-drop attention over the same selected blocks (time through FlexAttention; its error vs",
        "dense in parentheses next to PISA's). *dense GFLOP/s*: the dense kernel's rate, and in parentheses its share of",
        "the device's square-matmul rate measured in the same run (the practical ceiling of any GEMM-based kernel).",
        "",
    ]
    for name, runs in series([(p, d) for p, d in results if not (is_distributed(d) or is_static(d) or is_interleaved(d))]):
        if not any(d["records"] for _, d in runs):
            continue
        out += [f"## {name}", ""]
        if len(runs) > 1:
            out += [f"Summary of {len(runs)} runs (files {', '.join(p.name for p, _ in runs)}):", "",
                    *summary_table([d for _, d in runs]), ""]
        for path, data in runs:
            heading = [f"### {path.stem}", ""] if len(runs) > 1 else []
            out += [
                *heading,
                f"Device: {data['device']}; torch {data['torch']}, triton {data['triton']}, "
                f"{data.get('threads', '?')} threads; commit `{data['commit']}`"
                + (f"; square matmul {data['matmul_gflops']:.1f} GFLOP/s." if data.get("matmul_gflops") else "."),
                "",
                *table(data["records"], data.get("matmul_gflops")),
                "",
            ]
    for path, data in results:
        if data.get("quality"):
            out += quality_md(path, data)
    distributed = [(p, d) for p, d in results if is_distributed(d)]
    if distributed:
        out += scaling_md(distributed)
    compiled = [(p, d) for p, d in results if is_static(d)]
    if compiled:
        out += static_md(compiled)
    interleaved = [(p, d) for p, d in results if is_interleaved(d)]
    if interleaved:
        out += interleaved_md(interleaved)
    return "\n".join(out)


def readme_table(results: list[tuple[Path, dict]]) -> str:
    results = [(p, d) for p, d in results if not (is_distributed(d) or is_static(d) or is_interleaved(d))]
    if not results:
        return "No benchmark results are committed yet."
    lines = []
    for name, runs in series(results):
        docs = [d for _, d in runs]
        if not any(d["records"] for d in docs):
            continue
        over = f"medians of {len(runs)} runs, " if len(runs) > 1 else ""
        lines += [f"**{name}** — {docs[0]['device']} (forward; {over}full tables in BENCHMARKS.md):", ""]
        lines += ["| method | options | backend | shape | ms | dense ms | speedup | efficiency on needed work |",
                  "|---|---|---|---|---|---|---|---|"]
        for recs in per_case(docs):
            r = recs[0]
            if r["pass"] != "fwd":
                continue
            med = _medians(recs)
            lines.append(f"| {r['method']} | {_options(r)} | {r['backend']} | {_shape(r)} | {med['ms']:.2f} | "
                         f"{med['dense_ms']:.2f} | {med['speedup']:.2f}× | {med['efficiency']:.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def render() -> tuple[str, str]:
    results = _load()
    readme = (ROOT / "README.md").read_text()
    readme = _between(readme, README_START, README_END, readme_table(results))
    readme = _between(readme, SCALING_START, SCALING_END,
                      scaling_readme([(p, d) for p, d in results if is_distributed(d)]))
    return benchmarks_md(results) + "\n", readme


def _between(text: str, start_marker: str, end_marker: str, body: str) -> str:
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    return text[:start] + "\n" + body + "\n" + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated files are out of date")
    args = parser.parse_args()
    bench_md, readme = render()
    targets = {ROOT / "BENCHMARKS.md": bench_md, ROOT / "README.md": readme}
    plots = [(pareto_path(path), data) for path, data in _load() if data.get("quality")]
    if args.check:
        stale = [p.name for p, text in targets.items() if not p.exists() or p.read_text() != text]
        stale += [p.name for p, _ in plots if not p.exists()]
        if stale:
            print("out of date: " + ", ".join(stale) + " (run python benchmarks/report.py)", file=sys.stderr)
            return 1
        return 0
    for path, text in targets.items():
        path.write_text(text)
    if plots:
        from difattn.bench.quality_suite import pareto_plot

        for path, data in plots:
            if not pareto_plot(data["quality"], path, f"{path.stem.removesuffix('-pareto')}: {data['device']}"):
                print(f"{path.name}: not drawn (needs matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
