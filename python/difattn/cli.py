"""The ``difattn`` command: ``difattn info`` and ``difattn bench``."""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import torch

from . import __version__
from ._native import core, core_status
from .backends import METHODS, availability
from .bench import block as bench_block
from .bench import cases as bench_cases
from .bench import distributed as bench_distributed
from .bench import interleaved as bench_interleaved
from .bench import static as bench_static
from .bench.digits import DEFAULT_WEIGHTS as DIGITS_WEIGHTS
from .bench.quality_suite import default_quality, format_quality_table, pareto_plot, run_quality
from .bench.runner import BenchConfig, format_table, plot, run, write_json
from .grid import TokenGrid

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_GRID_PATTERN = re.compile(r"^(?:(\d+)x)?(\d+)x(\d+)(?:\+(\d+)(first|last)?)?$")


def parse_grid(text: str) -> TokenGrid:
    """``[F x]H x W[+T[first|last]]``, e.g. ``64x64``, ``64x64+512``, ``16x30x52+226last``."""
    match = _GRID_PATTERN.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--grid: expected [FRAMESx]HEIGHTxWIDTH[+TEXT[first|last]], got {text!r}")
    frames, height, width, text_tokens, position = match.groups()
    try:
        return TokenGrid(int(height), int(width), frames=int(frames or 1), text_tokens=int(text_tokens or 0),
                         text_position=position or "first")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: {err}") from err


def parse_option(text: str) -> tuple[str, str, object]:
    """``METHOD.NAME=VALUE``, e.g. ``clear.radius=12`` or ``grat.group=(4,4)``: the value as a Python literal
    (a bare word stays a string: ``grat.pattern=criss_cross``)."""
    target, sep, value = text.partition("=")
    method, dot, name = target.strip().partition(".")
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"--option: expected METHOD.NAME=VALUE, e.g. clear.radius=12, got {text!r}")
    try:
        return method, name, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return method, name, value.strip()


def _json_path(out: str | None, default: str) -> Path:
    """``--out``: a file, or a directory (existing, or given with a trailing slash) to write ``default`` in."""
    if out is None:
        return Path(default)
    path = Path(out)
    return path / default if path.is_dir() or out.endswith(("/", "\\")) else path


def _info(_: argparse.Namespace) -> int:
    print(f"difattn {__version__}")
    ok, reason = core_status()
    print("compiled core: " + (", ".join(f"{k}={v}" for k, v in core().build_info()) if ok else f"missing: {reason}"))
    if ok:
        print(_cpu_isa_line())
        print(_cpu_threads_line())
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"\nbackends on {device.type}:")
        for method in METHODS:
            parts = [name if can else f"{name}: no ({why})" for name, (can, why) in availability(method, device).items()]
            print(f"  {method:<7} " + "; ".join(parts))
    return 0


def _cpu_isa_line() -> str:
    """The CPU kernels' instruction-set level, the levels and vector features of this CPU (AMX and AVX512-FP16
    are listed when present, though no kernel uses them)."""
    try:
        level, levels, features = core().cpu_isa()
    except ValueError as err:  # a bad DIFATTN_CPU_ISA: every CPU kernel call raises the same
        return f"CPU ISA: error: {err}"
    unused = [f for f in features if f.startswith("amx") or f == "avx512fp16"]
    used = [f for f in features if f not in unused]
    return (f"CPU ISA: {level} (this CPU runs {', '.join(levels)}; DIFATTN_CPU_ISA forces a lower one); "
            f"features: {' '.join(used) or 'baseline only'}" + (f"; present, not used: {' '.join(unused)}" if unused else ""))


def _cpu_threads_line() -> str:
    """Which threads run the CPU kernels' parallel loops: torch's OpenMP threads, or the core's rayon pool."""
    try:
        runtime, library = core().cpu_threads()
    except ValueError as err:  # a bad DIFATTN_CPU_THREADS_RUNTIME: every CPU kernel call raises the same
        return f"CPU threads: error: {err}"
    where = f"torch's OpenMP runtime, {library}" if runtime == "openmp" else "the core's own pool"
    return (f"CPU threads: {runtime} ({where}; {torch.get_num_threads()} threads; "
            "DIFATTN_CPU_THREADS_RUNTIME=auto|openmp|rayon chooses)")


def _bench(args: argparse.Namespace) -> int:
    if args.static:
        return _bench_static(args)
    if args.world_size is not None:
        return _bench_distributed(args)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("difattn bench: --device cuda but CUDA is not available here", file=sys.stderr)
            return 2
    if args.block:
        return _bench_block(args, device)
    on_gpu = device.type == "cuda"
    if args.grid:
        shapes = tuple(bench_cases.Shape(g, args.batch or 1, args.heads or 4, args.head_dim or 64) for g in args.grid)
    elif args.tokens:
        shapes = bench_cases.shapes_for_tokens(args.tokens, args.heads or 4, args.head_dim or 64, args.batch or 1)
    elif on_gpu:
        shapes = bench_cases.GPU_QUICK_SHAPES if args.quick else bench_cases.GPU_SHAPES
    elif args.plot and not args.quality:
        shapes = bench_cases.CPU_QUICK_PLOT_SHAPES if args.quick else bench_cases.CPU_PLOT_SHAPES
    else:
        shapes = bench_cases.CPU_QUICK_SHAPES if args.quick else bench_cases.CPU_SHAPES
    dtype = _DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    if args.option and args.quality:
        print("difattn bench: --option sets the speed cases; --quality sweeps each method's own settings",
              file=sys.stderr)
        return 2
    overrides: dict[str, dict] = {}
    for method, name, value in args.option:
        overrides.setdefault(method, {})[name] = value
    try:
        cases = bench_cases.with_options(bench_cases.QUICK_CASES if args.quick else bench_cases.CASES, overrides)
    except ValueError as err:
        print(f"difattn bench: {err}", file=sys.stderr)
        return 2
    methods = tuple(dict.fromkeys([*args.methods, *overrides])) if args.methods else tuple(overrides or METHODS)
    cfg = BenchConfig(
        device=device, shapes=shapes, dtype=dtype, backward=args.backward, methods=methods, cases=cases,
        flex=args.flex, cpu_budget_s=0.3 if args.quick else 1.0,
    )
    print(f"difattn bench on {device} ({torch.get_num_threads()} threads), {dtype}, shapes: "
          + ", ".join(f"{s.label} B={s.batch} H={s.heads} D={s.head_dim}" for s in shapes))
    if args.interleaved:
        return _bench_interleaved(args, cfg)
    if args.quality:
        records, quality = [], run_quality(cfg, digits_weights=Path(args.digits_weights or DIGITS_WEIGHTS))
    else:
        records = run(cfg)
        print(format_table(records))
        print("err/rand: relative error against dense on the timed i.i.d. random q/k/v (nearly flat attention); "
              "quality on structured inputs below")
        quality = default_quality(cfg, records)
    print(format_quality_table(quality))
    path = _json_path(args.out, f"difattn-bench-{device.type}.json")
    write_json(path, device, dtype, records, quality)
    print(f"wrote {path}")
    if args.plot:
        drawn = pareto_plot(quality, Path(args.plot)) if args.quality else plot(records, Path(args.plot))
        print(f"wrote {args.plot}" if drawn else "--plot needs matplotlib (pip install 'difattn[bench]')")
    return 0


def _bench_interleaved(args: argparse.Namespace, cfg: BenchConfig) -> int:
    if cfg.device.type != "cpu" or args.quality or args.backward:
        print("difattn bench: --interleaved times the CPU forward (no --quality, --backward or CUDA)", file=sys.stderr)
        return 2
    print("attention alone and between torch Linear layers (Linear -> attention -> Linear, as in a DiT block); "
          "ratio = in chain / alone, fastest repeats (median: of the medians)")
    records = bench_interleaved.run_interleaved(cfg)
    print(bench_interleaved.format_interleaved_table(records))
    path = _json_path(args.out, f"difattn-bench-interleaved-{cfg.device.type}.json")
    bench_interleaved.write_json(path, cfg, records)
    print(f"wrote {path}")
    return 0


def _bench_block(args: argparse.Namespace, device: torch.device) -> int:
    if args.heads or args.head_dim or args.tokens:
        print("difattn bench: --block is DiT-XL/2's block (1152 wide, 16 heads of 72); --heads, --head-dim and "
              "--tokens do not apply (--grid sets its latent grid)", file=sys.stderr)
        return 2
    if args.grid and len(args.grid) > 1:
        print("difattn bench: --block takes one --grid", file=sys.stderr)
        return 2
    grid = args.grid[0] if args.grid else (TokenGrid(32, 32) if args.quick else bench_block.DEFAULT_GRID)
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = bench_block.BlockConfig(device=device, grid=grid, batch=args.batch or 1, dtype=dtype,
                                  methods=tuple(args.methods), budget_s=0.3 if args.quick else 1.0)
    print(f"difattn bench --block on {device} ({torch.get_num_threads()} threads), {dtype}: a DiT-XL/2 block "
          f"(hidden {cfg.hidden}, {cfg.heads} heads) on {_grid_label(grid)}, B={cfg.batch}, forward and forward+backward")
    records = bench_block.run_block(cfg)
    print(bench_block.format_block_table(records))
    path = Path(args.json or f"difattn-bench-block-{device.type}.json")
    write_json(path, device, dtype, records)
    print(f"wrote {path}")
    return 0


def _bench_distributed(args: argparse.Namespace) -> int:
    if args.world_size < 2:
        print("difattn bench: --world-size must be at least 2", file=sys.stderr)
        return 2
    if args.option:
        print("difattn bench: --option is not supported with --world-size (it times each method's first case)",
              file=sys.stderr)
        return 2
    if args.grid and len(args.grid) > 1:
        print("difattn bench: --world-size takes one --grid", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype or "float32"]
    cfg = bench_distributed.Config(
        world=args.world_size, grid=args.grid[0] if args.grid else TokenGrid(48, 48, text_tokens=64),
        B=args.batch or 1, H=args.heads or 8, D=args.head_dim or 64, dtype=dtype, backward=args.backward,
        methods=("dense", *(args.methods or METHODS)), repeats=3 if args.quick else 5,
        json=str(_json_path(args.out, f"difattn-bench-distributed-{args.world_size}.json")),
    )
    print(f"difattn bench on {cfg.world} processes, grid {_grid_label(cfg.grid)}, B={cfg.B} H={cfg.H} D={cfg.D}, "
          f"{dtype}: time per layer (slowest rank) and forward bytes each rank sends")
    bench_distributed.run(cfg)
    print(f"wrote {cfg.json}")
    return 0


def _bench_static(args: argparse.Namespace) -> int:
    head_dims = (args.head_dim,) if args.head_dim else (64, 128)
    print(f"difattn bench --static: every production Triton launch (fp16 and bf16, D={head_dims}) compiled for "
          f"sm_{args.arch} as a launch compiles it; no GPU used")
    report = bench_static.production_records(head_dims, (args.arch,))
    print(bench_static.format_table(report["records"]))
    for failure in report["failures"]:
        print(f"failed: {failure}", file=sys.stderr)
    path = _json_path(args.out, f"difattn-bench-static-sm{args.arch}.json")
    bench_static.write_json(path, report)
    print(f"wrote {path}")
    return 1 if report["failures"] else 0


def _grid_label(grid: TokenGrid) -> str:
    frames = f"{grid.frames}x" if grid.frames > 1 else ""
    text = f"+{grid.text_tokens}{grid.text_position}" if grid.text_tokens else ""
    return f"{frames}{grid.height}x{grid.width}{text}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difattn", description="Efficient attention for Diffusion Transformers")
    parser.add_argument("--version", action="version", version=f"difattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build, and which backends can run here").set_defaults(func=_info)
    bench = sub.add_parser("bench", help="time the methods against dense SDPA on this device")
    bench.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                       help=f"methods to time (default: all of {', '.join(METHODS)}; with --option only those set)")
    bench.add_argument("--option", action="append", default=[], type=parse_option, metavar="METHOD.NAME=VALUE",
                       help="time METHOD with this option (the rest from its first default case) instead of its "
                       "default cases, e.g. clear.radius=12 grat.group=(4,4) pisa.density=0.25; repeatable")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (default: cuda when available, else cpu)")
    bench.add_argument("--grid", nargs="+", type=parse_grid, help="token grids, e.g. 64x64 64x64+512 8x30x52+226last")
    bench.add_argument("--tokens", nargs="+", type=int, help="square image grids of about these token counts")
    bench.add_argument("--batch", type=int, help="batch size for --grid/--tokens (default 1)")
    bench.add_argument("--heads", type=int, help="heads for --grid/--tokens (default 4)")
    bench.add_argument("--head-dim", type=int, help="head dim for --grid/--tokens (default 64; --static: 64 and 128)")
    bench.add_argument("--dtype", choices=tuple(_DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    bench.add_argument("--backward", action="store_true", help="also time forward+backward")
    bench.add_argument("--quick", action="store_true", help="smaller shapes, one case per method, shorter timing")
    bench.add_argument("--flex", action="store_true", help="also time FlexAttention on CPU (always on CUDA)")
    bench.add_argument("--out", "--json", dest="out", metavar="PATH",
                       help="the JSON file to write, or a directory to write difattn-bench-<device>.json in "
                       "(default: that name in the current directory)")
    bench.add_argument("--plot", metavar="PNG", help="write a plot of speedup against tokens here (needs matplotlib; "
                       "on CPU without --grid/--tokens it times three sizes so the plot has a trend); with --quality "
                       "the Pareto plot of speedup against error and recall")
    bench.add_argument("--quality", action="store_true",
                       help="instead of the speed cases: each method's knob swept on structured inputs (error, recall "
                            "and speedup), captured attention patterns and end-to-end samples")
    bench.add_argument("--digits-weights", help=f"the trained digits PixelDiT for --quality (default: "
                       f"{DIGITS_WEIGHTS}; skipped when absent)")
    bench.add_argument("--block", action="store_true",
                       help="time a whole DiT-XL/2 block (hidden 1152, 16 heads, D=72) with each method against dense, "
                       "forward and forward+backward (--grid: its latent grid, default 64x64; --quick: 32x32)")
    bench.add_argument("--interleaved", action="store_true",
                       help="CPU: time each method's attention alone and between two torch Linear layers (Linear -> "
                       "attention -> Linear, as in a DiT block), to see what the torch ops around it cost it")
    bench.add_argument("--world-size", type=int, help="run the sequence-parallel schemes on this many processes "
                       "(gloo on CPU, NCCL with as many GPUs): bytes per rank and time per layer")
    bench.add_argument("--static", action="store_true", help="compile every production Triton launch for a GPU "
                       "(no GPU needed) and report registers, spills, shared memory, occupancy, tensor-core use")
    bench.add_argument("--arch", type=int, choices=(80, 90), default=90, help="GPU architecture of --static")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
