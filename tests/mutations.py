"""Mutation check: does the suite catch small, realistic bugs?

Run by hand before a release (not in CI; it rebuilds the Rust core for the Rust mutations and takes a while)::

    python tests/mutations.py            # every mutation
    python tests/mutations.py --list     # names only
    python tests/mutations.py clear-global-pad-first llsa-levels-boundary   # some of them

Each mutation replaces one exact snippet of one file by a plausible bug, in a temporary copy of the tree, and runs
the tests that should catch it. A mutation *survives* when those tests still pass: then the tests miss a real
change of output and need a sharper check. The script first runs every named test on the unmutated copy (they
must pass), then one mutation at a time, and exits 1 when any mutation survives or no longer applies (its snippet
moved: update the entry). When you fix a bug, add the bug as a mutation here with the test that now catches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """``old`` (occurring exactly once in ``path``) becomes ``new``; ``tests`` are pytest node ids that must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "dydila-lambda-swap", "python/difattn/_linear_layers.py",
        'lambda_q=lambdas["q"], lambda_k=lambdas["k"]', 'lambda_q=lambdas["k"], lambda_k=lambdas["q"]',
        ("tests/test_nn_dydila.py",),
    ),
    Mutation(
        "clear-global-pad-first", "python/difattn/functional.py",
        "(0, 0, 0, pad_w, 0, pad_h)", "(0, 0, pad_w, 0, pad_h, 0)",
        ("tests/test_nn_attention.py",),
    ),
    Mutation(
        "llsa-levels-boundary", "python/difattn/_options.py",
        "while num_tokens > LLSA_MAX_COARSE_TOKENS", "while num_tokens >= LLSA_MAX_COARSE_TOKENS",
        ("tests/llsa",),
    ),
    Mutation(
        "triton-disc-strict", "python/difattn/ops/block/disc_bits.py",
        "near = (d2 <= plan.max_d2)", "near = (d2 < plan.max_d2)",
        ("tests/block/test_disc_bits.py", "tests/block/test_block_interpreter.py"),
    ),
    Mutation(
        "clear-threshold-not-strict", "python/difattn/_options.py",
        "math.ceil(radius * radius) - 1", "math.floor(radius * radius)",
        ("tests/clear/test_clear_reference.py",),
    ),
    Mutation(
        "rust-max-below-not-strict", "rust/plan/blocks.rs",
        "(bound.ceil() as i64) - 1", "bound.floor() as i64",
        ("tests/clear/test_clear_rust.py",),
    ),
    Mutation(
        "rust-disc-row-half-width", "rust/cpu/clear/geometry.rs",
        "(rest >= 0).then(|| isqrt(rest))", "(rest > 0).then(|| isqrt(rest))",
        ("tests/clear/test_clear_rust.py",),
    ),
    Mutation(
        "rust-engine-disc-strict", "rust/cpu/block_attention.rs",
        "dy * dy + dx * dx <= max_d2", "dy * dy + dx * dx < max_d2",
        ("tests/block/test_block_plans.py",),
    ),
    Mutation(
        "rust-ready-without-core", "python/difattn/backends.py",
        "    return core_status()", '    return True, ""',
        ("tests/test_dispatch.py",),
    ),
    Mutation(
        "sd3-text-first", "python/difattn/diffusers/_families.py",
        '_image_2d("last")),', '_image_2d("first")),',
        ("tests/test_diffusers_processors.py", "tests/test_diffusers_apply.py"),
    ),
    Mutation(
        "wan-height-width-swap", "python/difattn/diffusers/_families.py",
        "Geometry(frames // pt, height // ph, width // pw, text(a)",
        "Geometry(frames // pt, width // pw, height // ph, text(a)",
        ("tests/test_diffusers_processors.py", "tests/test_diffusers_apply.py"),
    ),
    Mutation(
        "clear-global-seen-by-text", "python/difattn/reference/clear.py",
        "image_rows = ~grid.is_text(q.device)", "image_rows = torch.ones_like(grid.is_text(q.device))",
        ("tests/clear/test_clear_reference.py",),
    ),
    Mutation(
        "grat-criss-cross-video-as-image", "python/difattn/reference/grat.py",
        "image_pairs = (da == 0) | (dp == 0) | (dq == 0)", "image_pairs = (dp == 0) | (dq == 0)",
        ("tests/grat/test_grat_reference.py",),
    ),
    Mutation(
        "pisa-selected-count-ceil", "python/difattn/_options.py",
        "return max(1, math.floor(density * num_blocks))", "return max(1, math.ceil(density * num_blocks))",
        ("tests/pisa/test_pisa_reference.py",),
    ),
    Mutation(
        "pisa-tile-transposed", "python/difattn/_options.py",
        "return th, block_size // th", "return block_size // th, th",
        ("tests/pisa/test_pisa_reference.py",),
    ),
    Mutation(
        "triton-pisa-centroid-sum-not-rescaled", "python/difattn/triton_kernels/pisa.py",
        "b_z = b_z * b_alpha + tl.sum(", "b_z = b_z + tl.sum(",
        ("tests/pisa/test_pisa_interpreter.py",),
    ),
    Mutation(
        "rust-pisa-centroid-sum-not-rescaled", "rust/cpu/pisa.rs",
        "z[r] = z[r] * alpha + added;", "z[r] = z[r] + added;",
        ("tests/pisa/test_pisa_rust.py",),
    ),
    Mutation(
        "llsa-pooled-weight-dropped", "python/difattn/reference/llsa.py",
        "bias = torch.log(torch.cat(token_weights))[None, :]",
        "bias = torch.zeros_like(torch.cat(token_weights))[None, :]",
        ("tests/llsa/test_llsa_reference.py",),
    ),
    Mutation(
        "straight-through-soft-forward", "python/difattn/_linear_layers.py",
        "return hard + (soft - soft.detach())", "return soft",
        ("tests/test_nn_dydila.py",),
    ),
    Mutation(
        "kernel-bank-unclamped", "python/difattn/_linear_layers.py",
        "return self.bank.detach().clamp_min(self.minimum) + (self.bank - self.bank.detach())", "return self.bank",
        ("tests/test_nn_dydila.py",),
    ),
    Mutation(
        "pisa-llsa-grid-dropped", "python/difattn/_methods.py",
        'kwargs["grid"] = grid', 'kwargs["grid"] = None',
        ("tests/test_nn_attention.py",),
    ),
    Mutation(
        "default-scale", "python/difattn/_checks.py",
        "return head_dim**-0.5", "return head_dim**-0.25",
        ("tests/test_nn_attention.py",),
    ),
]


def tracked_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: the tree a commit would hold."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def copy_tree(dest: Path) -> None:
    for rel in tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    core = ROOT / "python" / "difattn" / "_core.abi3.so"
    if not core.exists():
        sys.exit(f"{core} is missing: build the core first (see the README)")
    shutil.copy2(core, dest / core.relative_to(ROOT))


def build_core(tree: Path, target_dir: Path) -> bool:
    """Rebuilds the Rust core of ``tree`` (incrementally, in ``target_dir``) and installs it into its package."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    done = subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "python"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-2000:])
        return False
    shutil.copy2(target_dir / "release" / "lib_core.so", tree / "python" / "difattn" / "_core.abi3.so")
    return True


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, list[str]]:
    """pytest's exit code on ``tests`` in ``tree`` (stops at the first failure), the seconds it took and the
    failed test ids."""
    env = dict(os.environ, PYTHONPATH=str(tree / "python"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("DIFATTN_HYPOTHESIS_PROFILE", None)  # the fixed local profile: the same examples every run
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired:
        code, output = -1, ""
    failed = [line.split()[1] for line in output.splitlines() if line.startswith("FAILED ")]
    return code, time.perf_counter() - start, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--tests", nargs="+", help="run these pytest ids instead of each mutation's own")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # one line per mutation as it finishes, also into a file or pipe
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path}")
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="difattn-mutations-") as tmp:
        tree, target_dir = Path(tmp) / "tree", Path(tmp) / "target"
        copy_tree(tree)
        if any(m.path.startswith("rust/") for m in chosen) and (ROOT / "target").is_dir():
            shutil.copytree(ROOT / "target", target_dir, symlinks=True)  # an incremental start for the rebuilds
        core = tree / "python" / "difattn" / "_core.abi3.so"
        clean_core = core.read_bytes()
        all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, seconds, failed = run_tests(tree, all_tests, args.timeout)
        print(f"baseline: {len(all_tests)} test targets {'pass' if code == 0 else 'FAIL'} ({seconds:.0f} s)")
        if code != 0:
            print("the named tests must pass on the unmutated tree; fix that first:", *failed)
            return 2
        for m in chosen:
            path = tree / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                results[m.name] = "stale"
                print(f"{m.name}: STALE (the snippet occurs {original.count(m.old)} times in {m.path})")
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                if m.path.startswith("rust/") and not build_core(tree, target_dir):
                    results[m.name] = "build failed"
                    print(f"{m.name}: the mutated core does not build")
                    continue
                code, seconds, failed = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
                core.write_bytes(clean_core)
            results[m.name] = {0: "SURVIVED", 1: "killed", -1: "timed out"}.get(code, f"pytest exit {code}")
            print(f"{m.name}: {results[m.name]} ({seconds:.0f} s)" + (f" by {failed[0]}" if failed else ""))
    survivors = [name for name, r in results.items() if r != "killed"]
    print(f"\n{len(results) - len(survivors)} of {len(results)} mutations killed"
          + (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
