"""Every CPU instruction-set level of the Rust kernels (scalar, AVX2, AVX-512, AVX-512 with bf16 dot products)
against the torch reference, forward and every gradient, one case per method with ragged blocks, head dim 72 and
strided inputs, in float32, bfloat16 and float16; the LLSA selection exactly; forcing a level through
``DIFATTN_CPU_ISA`` in a fresh process, and its errors. Levels this CPU lacks are skipped, naming the level."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import difattn
from difattn import reference
from difattn._native import core, core_status
from difattn.ops.pisa.method import pisa_on_kernels
from difattn.testing import compare_with_reference, random_qkv, torch_threads

pytestmark = pytest.mark.skipif(not core_status()[0], reason="the compiled core is missing")

DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_clear(cpu_isa, dtype):
    grid = difattn.TokenGrid(13, 11, text_tokens=5)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 72, dtype=dtype, seed=1, token_major=True)
    compare_with_reference(
        f"clear {cpu_isa}",
        lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=3.5, backend="rust"),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=3.5, scale=72**-0.5),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_grat(cpu_isa, dtype):
    grid = difattn.TokenGrid(12, 10, text_tokens=3, text_position="last")
    q, k, v = random_qkv(2, 1, grid.num_tokens, 40, dtype=dtype, seed=2)
    kw = dict(group=(4, 4), pattern="neighbors", reach=1)
    compare_with_reference(
        f"grat {cpu_isa}",
        lambda q, k, v: difattn.grat_attention(q, k, v, grid, backend="rust", **kw),
        lambda q, k, v: reference.grat_attention(q, k, v, grid, scale=40**-0.5, **kw),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_pisa(cpu_isa, dtype):
    q, k, v = random_qkv(1, 2, 300, 72, dtype=dtype, seed=3, token_major=True)
    opts = dict(density=0.25, block_size=64, order="hybrid", routing_bias=None, sink=None, grid=None, scale=72**-0.5)
    _, blocks = pisa_on_kernels(q, k, v, backend="rust", return_blocks=True, **opts)
    compare_with_reference(
        f"pisa {cpu_isa}",
        lambda q, k, v: pisa_on_kernels(q, k, v, backend="rust", return_blocks=False, blocks=blocks, **opts),
        lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, **{k: v for k, v in opts.items() if k != "grid"}),
        (q, k, v),
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_llsa(cpu_isa, dtype, threads):
    """The selection (exactly, as the reference makes it), then attention given it; 1 thread runs the one-pass
    backward, 2 threads the two-pass one."""
    grid = difattn.TokenGrid(9, 14, text_tokens=5)
    kw = dict(block_size=4, topk=(3, 2), levels=2, grid=grid)
    with torch_threads(threads):
        q, k, v = random_qkv(1, 2, grid.num_tokens, 72, dtype=dtype, seed=4, token_major=True)
        _, indices = difattn.llsa_attention(q, k, v, return_indices=True, backend="rust", **kw)
        _, want = reference.llsa_attention(q.double(), k.double(), v.double(), return_indices=True, **kw)
        for got, expected in zip(indices, want):
            assert torch.equal(got, expected), f"llsa selection {cpu_isa} {dtype}"
        compare_with_reference(
            f"llsa {cpu_isa}",
            lambda q, k, v: difattn.llsa_attention(q, k, v, backend="rust", **kw),
            lambda q, k, v: reference.llsa_attention(q, k, v, scale=72**-0.5, indices=indices, **kw),
            (q, k, v),
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(cpu_isa, dtype):
    q, k, v = random_qkv(2, 1, 300, 72, dtype=dtype, seed=5, token_major=True)
    q, k = q.relu() + 0.05, k.relu() + 0.05
    compare_with_reference(
        f"linear {cpu_isa}",
        lambda q, k, v: difattn.linear_attention(q, k, v, normalize=True, backend="rust"),
        lambda q, k, v: reference.linear_attention(q, k, v, normalize=True),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dydila(cpu_isa, dtype):
    B, H, N, D = 1, 2, 150, 72
    q, k, v = random_qkv(B, H, N, D, dtype=dtype, seed=6)
    q_aux, k_aux, _ = random_qkv(B, H, N, D, dtype=dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    params = [1.0 + 4.0 * torch.rand(B, H, N, generator=gen) for _ in range(4)]
    params += [0.5 * torch.rand(B, H, N, generator=gen) for _ in range(2)]
    names = ("gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k")

    def run(backend):
        def fn(q, k, v, q_aux, k_aux, *p):
            kw = dict(zip(names, p))
            if backend == "reference":
                return reference.dydila_attention(q, k, v, q_aux, k_aux, **kw)
            return difattn.dydila_attention(q, k, v, q_aux, k_aux, **kw, backend="rust")
        return fn

    compare_with_reference(f"dydila {cpu_isa}", run("rust"), run("reference"), (q, k, v, q_aux, k_aux, *params))


def _fresh(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DIFATTN_CPU_ISA"}
    if isa is not None:
        env["DIFATTN_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_forces_a_lower_level_in_a_fresh_process():
    supported = core().cpu_isa()[1]
    code = ("import torch, difattn; from difattn._native import core; q = torch.randn(1, 1, 20, 8); "
            "difattn.linear_attention(q.relu(), q.relu(), q, backend='rust'); print(core().cpu_isa()[0])")
    for level in supported:
        run = _fresh(code, level)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split()[-1] == level


def test_bad_environment_variable_is_an_error_naming_it():
    code = ("import torch, difattn; q = torch.randn(1, 1, 20, 8)\n"
            "try:\n    difattn.linear_attention(q.relu(), q.relu(), q, backend='rust')\n"
            "except ValueError as err:\n    print('ValueError:', err)")
    run = _fresh(code, "sse9")
    assert run.returncode == 0, run.stderr
    assert "ValueError: DIFATTN_CPU_ISA=sse9: unknown level" in run.stdout
    missing = [level for level in ("avx2", "avx512", "avx512bf16") if level not in core().cpu_isa()[1]]
    if not missing:
        pytest.skip("this CPU runs every level: no level to refuse")
    run = _fresh(code, missing[0])
    assert f"ValueError: DIFATTN_CPU_ISA={missing[0]}: {missing[0]} needs" in run.stdout, run.stdout + run.stderr


def test_set_cpu_isa_refuses_unknown_levels_and_restores_the_default():
    default = core().cpu_isa()[0]
    with pytest.raises(ValueError, match='level: unknown CPU ISA "neon"'):
        core().set_cpu_isa("neon")
    assert core().cpu_isa()[0] == default
    assert core().set_cpu_isa("scalar") == "scalar"
    assert core().set_cpu_isa(None) == default
