"""``difattn bench --static``: the Triton kernels compiled as a GPU launch compiles them, read without a GPU.

Every op runs forward and backward on small CPU tensors under Triton's interpreter while each kernel launch is
recorded with Triton's own specialisation of its real arguments (integers equal to 1, e.g. inner strides, become
constants; pointers aligned to 16 bytes and integers divisible by 16 get divisibility hints), its constexprs,
``num_warps`` and ``num_stages``. A process without the interpreter then compiles every recorded launch ahead of
time with ``triton.compile`` for a GPU architecture (Triton bundles ``ptxas`` and ``cuobjdump``), which yields the
same binary a launch of those arguments compiles on the GPU, and reads from it: registers and spilled bytes (the
ptxas report), shared memory, occupancy, tensor-core instructions (``HGMMA``: Hopper's wgmma; ``HMMA``:
``mma.sync``) and the instruction count of the kernel's longest loop.

    python -m difattn.bench.static record DTYPE HEAD_DIM SHAPES   # under TRITON_INTERPRET=1: launch specs (JSON)
    python -m difattn.bench.static compile                        # specs and archs on stdin: records (JSON)
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile

# Shapes of `run_every_op`. TINY: small blocks and grids; PRODUCTION: the GPU plans' full 128 x 64 blocks for
# CLEAR and GRAT, PISA's and LLSA's default block sizes. N is not a multiple of any block in either.
SHAPES = {
    "tiny": {"grid": (5, 7, 3), "radius": 2.5, "group": (2, 3), "pisa_block": 16, "llsa_block": 4,
             "llsa_levels": 2},
    "production": {"grid": (16, 24, 7), "radius": 4.5, "group": (4, 4), "pisa_block": 64, "llsa_block": 16,
                   "llsa_levels": 1},
}
# Largest dynamic shared memory per block and per SM (bytes), registers and warps per SM.
_SM = {90: {"smem_block": 232448, "smem_sm": 233472, "regs": 65536, "warps": 64, "blocks": 32},
       80: {"smem_block": 166912, "smem_sm": 167936, "regs": 65536, "warps": 64, "blocks": 32}}
SHARED_LIMIT = {arch: sm["smem_block"] for arch, sm in _SM.items()}


# --- recording (under TRITON_INTERPRET=1) ------------------------------------------------------------------------


def launch_spec(interpreted, args: tuple, kwargs: dict) -> dict:
    """``{module, name, signature, constexprs, divisible, options}`` of one launch of the interpreted kernel
    ``interpreted``, specialised as Triton's JIT specialises these arguments (JSON-ready)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    fn = interpreted.fn
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    no_value = set(interpreted.kwargs.get("do_not_specialize") or ())
    no_align = set(interpreted.kwargs.get("do_not_specialize_on_alignment") or ())
    parameters = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in parameters], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in parameters}})
    options = {k: v for k, v in kwargs.items() if k not in bound}
    signature, constexprs, divisible = {}, {}, []
    for i, p in enumerate(parameters):
        value = bound.get(p.name, p.default)
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        if "constexpr" in annotation:
            kind, key = "constexpr", None
        else:
            kind, key = native_specialize_impl(backend, value, False, p.name not in no_value and i not in no_value,
                                               p.name not in no_align and i not in no_align)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = value
        elif key == "D":
            divisible.append(p.name)
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "options": options}


class LaunchRecorder:
    """Records every kernel launch under the interpreter (a context manager); :meth:`phase` labels the launches
    of one method's pass at head dim ``D``. ``launches``: ``{"method", "pass", "D", "spec"}`` dicts, each distinct
    one once."""

    def __init__(self):
        self.launches: list[dict] = []
        self._seen: set[str] = set()
        self._label = {"method": None, "pass": None, "D": None}

    @contextlib.contextmanager
    def phase(self, method: str, pass_: str, head_dim: int):
        self._label = {"method": method, "pass": pass_, "D": head_dim}
        try:
            yield
        finally:
            self._label = {"method": None, "pass": None, "D": None}

    def __enter__(self):
        from triton.runtime import interpreter

        self._original = original = interpreter.InterpretedFunction.run
        recorder = self

        def run(interpreted, *args, grid, warmup, **kwargs):
            launch = {**recorder._label, "spec": launch_spec(interpreted, args, dict(kwargs))}
            key = json.dumps(launch, sort_keys=True)
            if key not in recorder._seen:
                recorder._seen.add(key)
                recorder.launches.append(launch)
            return original(interpreted, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime import interpreter

        interpreter.InterpretedFunction.run = self._original
        return False


def run_every_op(dtype, head_dim: int, shapes: dict, recorder: LaunchRecorder | None = None) -> None:
    """Forward and backward of every op on the Triton backend at ``shapes`` (an entry of :data:`SHAPES`), each
    pass inside ``recorder.phase(method, pass)`` when given."""
    import torch

    import difattn

    gen = torch.Generator().manual_seed(0)
    grid = difattn.TokenGrid(*shapes["grid"][:2], text_tokens=shapes["grid"][2])
    n = grid.num_tokens
    phase = recorder.phase if recorder is not None else (lambda *label: contextlib.nullcontext())

    def qkv(count=3, positive=False):
        xs = [torch.randn(1, 2, n, head_dim, generator=gen).to(dtype) for _ in range(count)]
        return [(x.abs() if positive else x).requires_grad_() for x in xs]

    def both(method, op):
        with phase(method, "fwd", head_dim):
            out = op()
        with phase(method, "bwd", head_dim):
            out.float().sum().backward()

    q, k, v = qkv()
    both("clear", lambda: difattn.clear_attention(q, k, v, grid, radius=shapes["radius"], backend="triton"))
    both("grat", lambda: difattn.grat_attention(q, k, v, grid, group=shapes["group"], pattern="criss_cross",
                                                backend="triton"))
    for order in ("hybrid", "zeroth"):
        both(f"pisa-{order}", lambda order=order: difattn.pisa_attention(q, k, v, density=0.5, block_size=shapes["pisa_block"],
                                                             order=order, backend="triton"))
    both("llsa", lambda: difattn.llsa_attention(q, k, v, block_size=shapes["llsa_block"], topk=2,
                                                levels=shapes["llsa_levels"], backend="triton"))
    fq, fk, fv = qkv(positive=True)
    both("linear", lambda: difattn.linear_attention(fq, fk, fv, normalize=True, backend="triton"))
    q_aux, k_aux = qkv(2)
    gamma = (1 + torch.rand(1, 2, n, generator=gen)).to(dtype).requires_grad_()
    lam = (0.3 * torch.rand(1, 2, n, generator=gen)).to(dtype).requires_grad_()
    both("dydila", lambda: difattn.dydila_attention(q, k, v, q_aux, k_aux, gamma_q=gamma, gamma_k=gamma,
                                                    gamma_q_aux=gamma, gamma_k_aux=gamma, lambda_q=lam,
                                                    lambda_k=lam, backend="triton"))


def with_bf16_twins(launches: list[dict]) -> list[dict]:
    """``launches`` and the bf16 twin of every fp16 launch (bf16 ``tl.dot`` does not run in the interpreter): bf16
    pointers, and the linear kernels' matmul precision of bf16 inputs."""
    import torch

    from ..triton_kernels import linear_attention

    twins = json.loads(json.dumps(launches).replace('"*fp16"', '"*bf16"'))
    for twin in twins:
        constexprs = twin["spec"]["constexprs"]
        if (twin["spec"]["module"] == linear_attention.__name__
                and constexprs.get("PRECISION") == linear_attention.matmul_precision(torch.float16)):
            constexprs["PRECISION"] = linear_attention.matmul_precision(torch.bfloat16)
    return launches + [x for x in twins if x not in launches]


# --- compiling and reading the binaries (without TRITON_INTERPRET) ------------------------------------------------


def _ptxas_report(log: str) -> tuple[int, int]:
    """Registers and spilled bytes (the larger of stores and loads) from ``ptxas -v``'s report."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no register report in the ptxas log: {log[-500:]!r}")
    return int(regs[1]), max(int(spills[1]), int(spills[2]))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_counts(sass: str) -> dict:
    """``wgmma`` (HGMMA), ``mma_sync`` (HMMA) instructions and ``loop_instructions``: the instructions between the
    target and the source of the backward branch that spans the most (the kernel's main loop; 0 without one)."""
    instructions = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    loop = 0
    for i, (address, text) in enumerate(instructions):
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if branch and int(branch[1], 16) < address:
            loop = max(loop, sum(1 for a, _ in instructions[: i + 1] if a >= int(branch[1], 16)))
    names = [text.split()[0] if not text.startswith("@") else text.split()[1] for _, text in instructions]
    return {"wgmma": sum(n.startswith("HGMMA") for n in names), "mma_sync": sum(n.startswith("HMMA") for n in names),
            "loop_instructions": loop}


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> float:
    """Resident warps per SM as a fraction of the most an SM holds, from registers (256-register units per
    warp), shared memory (1 KB reserved per block) and the warp and block limits."""
    sm = _SM[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256
    blocks = min(sm["blocks"], sm["warps"] // num_warps, (sm["regs"] // regs_per_warp) // num_warps,
                 sm["smem_sm"] // (smem + 1024))
    return blocks * num_warps / sm["warps"]


def compile_launch(spec: dict, arch: int) -> dict:
    """Compiles ``spec`` for ``sm_<arch>`` and returns what its binary shows (see the module docstring)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    target = GPUTarget("cuda", arch, 32)
    hint = make_backend(target).parse_attr("D")
    attrs = {(fn.arg_names.index(name),): hint for name in spec["divisible"]}
    source = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # a cached binary would come without the ptxas report
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(source, target=target, options=spec["options"])
    regs, spill = _ptxas_report(log.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    smem = kernel.metadata.shared
    warps = kernel.metadata.num_warps
    return {"arch": arch, "regs": regs, "spill_bytes": spill, "smem_bytes": smem,
            "occupancy": occupancy(arch, regs, smem, warps), "num_warps": warps,
            "num_stages": kernel.metadata.num_stages, **sass_counts(sass)}


def _dtype(spec: dict) -> str:
    """The element type of the launch's first floating-point tensor argument (what its matmuls take)."""
    types = [t for t in spec["signature"].values() if t in ("*fp16", "*bf16", "*fp32")]
    return {"*fp16": "float16", "*bf16": "bfloat16", "*fp32": "float32"}[types[0]] if types else "?"


def compile_all(launches: list[dict], archs: list[int]) -> dict:
    """Every launch for every arch: ``{"triton", "records", "failures"}`` (records in launch order)."""
    import triton

    done: dict[str, dict] = {}
    records, failures = [], []
    for launch in launches:
        spec = launch["spec"]
        for arch in archs:
            key = json.dumps([spec, arch], sort_keys=True)
            try:
                if key not in done:
                    done[key] = compile_launch(spec, arch)
                records.append({"kernel": spec["name"], "method": launch["method"], "pass": launch["pass"],
                                "D": launch["D"], "dtype": _dtype(spec), **done[key],
                                "constexprs": spec["constexprs"]})
            except Exception as exc:  # report every failing kernel, not only the first
                failures.append(f"{spec['name']} sm_{arch} {spec['constexprs']}: {type(exc).__name__}: {exc}"[:2000])
    from triton import knobs

    ptxas = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True, check=False).stdout
    return {"triton": triton.__version__, "ptxas": ptxas.strip().splitlines()[-1] if ptxas else None,
            "records": records, "failures": failures}


# --- driving both processes ----------------------------------------------------------------------------------------


def _python(args: list[str], payload, interpret: bool, python: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
         *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([python or sys.executable, "-m", "difattn.bench.static", *args], input=json.dumps(payload),
                          env=env, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"difattn.bench.static {args[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def record(dtype: str, head_dim: int, shapes: str) -> list[dict]:
    """The launches of :func:`run_every_op` (in a subprocess under the interpreter)."""
    return _python(["record", dtype, str(head_dim), shapes], None, interpret=True)["launches"]


def compile_records(launches: list[dict], archs: list[int], python: str | None = None) -> dict:
    """:func:`compile_all` in a subprocess without the interpreter (``python``: another interpreter, e.g. a venv
    with an older triton)."""
    return _python(["compile"], [launches, archs], interpret=False, python=python)


def production_records(head_dims=(64, 128), archs=(90,), python: str | None = None) -> dict:
    """Every production launch (fp16 recorded, bf16 twins) at each head dim, compiled for each arch."""
    launches = []
    for d in head_dims:
        launches += [x for x in with_bf16_twins(record("float16", d, "production")) if x not in launches]
    return compile_records(launches, list(archs), python)


COLUMNS = ("kernel", "method", "pass", "D", "dtype", "arch", "regs", "spill_bytes", "smem_bytes", "occupancy",
           "wgmma", "mma_sync", "loop_instructions")


def table_rows(records: list[dict]) -> list[list[str]]:
    """:data:`COLUMNS` of each record as text (occupancy as a percentage)."""
    return [[f"{r[c]:.0%}" if c == "occupancy" else str(r[c]) for c in COLUMNS] for r in records]


def format_table(records: list[dict]) -> str:
    rows = [list(COLUMNS), *table_rows(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_json(path, report: dict) -> None:
    """``report`` of :func:`production_records` with ``"kind": "static"``, the commit and the table's columns, as
    JSON at ``path``."""
    from pathlib import Path

    from .runner import _commit

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "static", "commit": _commit(), "columns": COLUMNS, **report}, indent=1) + "\n")


def _main(argv: list[str]) -> int:
    if argv[0] == "record":
        import torch

        recorder = LaunchRecorder()
        with recorder:
            run_every_op(getattr(torch, argv[1]), int(argv[2]), SHAPES[argv[3]], recorder)
        print(json.dumps({"launches": recorder.launches}))
    elif argv[0] == "compile":
        launches, archs = json.load(sys.stdin)
        print(json.dumps(compile_all(launches, archs)))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
