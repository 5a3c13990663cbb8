"""Tier 1: every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) with the installed triton, on a
machine without a GPU, and fits the target's shared memory.

The interpreter runs small calls of every op, forward and backward, while each kernel launch is recorded (its
argument types, constexpr values, num_warps and num_stages); then a subprocess without ``TRITON_INTERPRET``
compiles every distinct launch ahead of time with ``triton.compile`` down to a cubin (triton bundles ptxas). This
catches what the interpreter cannot: type errors of the real compiler, shared-memory and register layouts,
features missing from an older triton (``DIFATTN_AOT_PYTHON=<python of a venv with triton 3.6>`` compiles the
launches recorded here with that version too). A second case records
the launches of production tiles (a grid big enough for the GPU plans' 128 x 64 blocks, head dim 128) in fp16 and
also compiles their bf16 twins (bf16 ``tl.dot`` does not run in the interpreter).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import difattn
from difattn.testing import random_qkv

pytestmark = pytest.mark.interpreter

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records launches under TRITON_INTERPRET=1 (machines without CUDA)", allow_module_level=True)
triton_interpreter = pytest.importorskip("triton.runtime.interpreter")

_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
    torch.bool: "*i1",
}


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    return "constexpr" in (annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def _scalar_type(name: str, value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    raise TypeError(f"argument {name}: cannot type {type(value).__name__} for ahead-of-time compilation")


def _launch_spec(fn, args: tuple, kwargs: dict) -> dict:
    """``{module, name, signature, constexprs, options}`` of one launch, JSON-ready."""
    parameters = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in parameters], args))
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for p in parameters:
        value = bound[p.name] if p.name in bound else p.default
        if _is_constexpr(p) or value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        else:
            signature[p.name] = _scalar_type(p.name, value)
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


@pytest.fixture
def recorded_launches(monkeypatch):
    launches: dict[str, dict] = {}
    original = triton_interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        spec = _launch_spec(self.fn, args, dict(kwargs))
        launches.setdefault(json.dumps(spec, sort_keys=True), spec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(triton_interpreter.InterpretedFunction, "run", run)
    return launches


# Shapes of `_run_every_op`: tiny ones, and production tiles (the CLEAR and GRAT plans reach their full 128 x 64
# blocks, PISA's and LLSA's default block sizes). N is not a multiple of any block in either.
_TINY = {"grid": difattn.TokenGrid(5, 7, text_tokens=3), "radius": 2.5, "group": (2, 3), "pisa_block": 16,
         "llsa_block": 4, "llsa_levels": 2}
_PRODUCTION = {"grid": difattn.TokenGrid(16, 24, text_tokens=7), "radius": 4.5, "group": (4, 4), "pisa_block": 64,
               "llsa_block": 16, "llsa_levels": 1}


def _run_every_op(dtype: torch.dtype, head_dim: int, shapes: dict) -> None:
    """Forward and backward of every op on the Triton backend at ``shapes``."""
    gen = torch.Generator().manual_seed(0)
    grid = shapes["grid"]
    n = grid.num_tokens

    def qkv(count=3, positive=False):
        xs = [torch.randn(1, 2, n, head_dim, generator=gen).to(dtype) for _ in range(count)]
        return [(x.abs() if positive else x).requires_grad_() for x in xs]

    def backward(out):
        out.float().sum().backward()

    q, k, v = qkv()
    backward(difattn.clear_attention(q, k, v, grid, radius=shapes["radius"], backend="triton"))
    backward(difattn.grat_attention(q, k, v, grid, group=shapes["group"], pattern="criss_cross", backend="triton"))
    for order in ("hybrid", "zeroth"):
        backward(difattn.pisa_attention(q, k, v, density=0.5, block_size=shapes["pisa_block"], order=order,
                                        backend="triton"))
    backward(difattn.llsa_attention(q, k, v, block_size=shapes["llsa_block"], topk=2, levels=shapes["llsa_levels"],
                                    backend="triton"))
    fq, fk, fv = qkv(positive=True)
    backward(difattn.linear_attention(fq, fk, fv, normalize=True, backend="triton"))
    q_aux, k_aux = qkv(2)
    gamma = (1 + torch.rand(1, 2, n, generator=gen)).to(dtype).requires_grad_()
    lam = (0.3 * torch.rand(1, 2, n, generator=gen)).to(dtype).requires_grad_()
    backward(difattn.dydila_attention(q, k, v, q_aux, k_aux, gamma_q=gamma, gamma_k=gamma, gamma_q_aux=gamma,
                                      gamma_k_aux=gamma, lambda_q=lam, lambda_k=lam, backend="triton"))


_COMPILER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

specs, targets = json.load(sys.stdin)
# Largest dynamic shared memory per block (bytes): sm_90 (H100/H200) and sm_80 (A100).
shared_limit = {90: 232448, 80: 166912}
failures = []
for spec in specs:
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    for arch in targets:
        try:
            source = ASTSource(fn, spec["signature"], spec["constexprs"])
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec["options"])
            assert kernel.asm["cubin"], "empty cubin"
            shared = kernel.metadata.shared
            assert shared <= shared_limit[arch], f"{shared} bytes of shared memory, the limit is {shared_limit[arch]}"
        except Exception as exc:  # report every failing kernel, not only the first
            failures.append(f"{spec['name']} sm_{arch} {spec['constexprs']}: {type(exc).__name__}: {exc}"[:2000])
print(json.dumps({"triton": triton.__version__, "compiled": len(specs) * len(targets), "failures": failures}))
"""


def _with_bf16_twins(specs: list[dict]) -> list[dict]:
    """``specs`` and the bf16 twin of every fp16 launch."""
    return specs + json.loads(json.dumps(specs).replace('"*fp16"', '"*bf16"'))


def _compile_all(specs: list[dict], targets: list[int]) -> None:
    """Compiles every launch for every target in a subprocess without ``TRITON_INTERPRET`` and fails on any error
    or shared-memory overflow."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    compiler = os.environ.get("DIFATTN_AOT_PYTHON", sys.executable)
    done = subprocess.run([compiler, "-c", _COMPILER], input=json.dumps([specs, targets]), env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n".join(report["failures"])
    assert report["compiled"] == len(specs) * len(targets)


@pytest.mark.parametrize("dtype, head_dim, shapes, targets", [
    (torch.float32, 24, _TINY, [90]),
    (torch.float16, 72, _TINY, [90, 80]),
    (torch.float16, 128, _PRODUCTION, [90]),
], ids=["tiny-fp32", "tiny-fp16", "production-fp16-bf16"])
def test_every_kernel_compiles_for_hopper_and_ampere(recorded_launches, dtype, head_dim, shapes, targets):
    _run_every_op(dtype, head_dim, shapes)
    specs = list(recorded_launches.values())
    if shapes is _PRODUCTION:
        specs = _with_bf16_twins(specs)
    kernels = {spec["name"] for spec in specs}
    assert len(kernels) >= 12, f"expected launches of every kernel, recorded {sorted(kernels)}"
    _compile_all(specs, targets)


def test_block_engine_fits_ampere_at_head_dim_256(recorded_launches):
    """Head dim 256 on production tiles: the block engine's forward and backward (64-query blocks for wide heads)
    fit an A100's shared memory as well as an H100's, in fp16 and bf16."""
    grid = _PRODUCTION["grid"]
    q, k, v = random_qkv(1, 1, grid.num_tokens, 256, dtype=torch.float16, seed=4, requires_grad=True)
    difattn.clear_attention(q, k, v, grid, radius=_PRODUCTION["radius"], backend="triton").float().sum().backward()
    specs = _with_bf16_twins(list(recorded_launches.values()))
    assert {spec["name"] for spec in specs} == {"_block_attention_fwd_kernel", "_block_attention_bwd_dq_kernel",
                                                "_block_attention_bwd_dkv_kernel"}
    _compile_all(specs, [90, 80])
