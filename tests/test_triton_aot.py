"""Tier 1: every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) with the installed triton, on a
machine without a GPU, as a GPU launch compiles it, and fits the target's shared memory; production kernels do not
spill registers and use Hopper's wgmma.

The interpreter runs small calls of every op, forward and backward, while each kernel launch is recorded with
triton's own specialisation of its real arguments (inner strides of 1 become constants, aligned pointers and
16-divisible integers get divisibility hints), its constexprs, num_warps and num_stages
(``difattn.bench.static``); then a subprocess without ``TRITON_INTERPRET`` compiles every distinct launch ahead of
time with ``triton.compile`` down to a cubin (triton bundles ptxas) and reads registers, spills, shared memory and
tensor-core instructions from it. This catches what the interpreter cannot: type errors of the real compiler,
shared-memory and register layouts, features missing from an older triton (``DIFATTN_AOT_PYTHON=<python of a venv
with triton 3.6>`` compiles the launches recorded here with that version too). The production case records the
launches of production tiles (a grid big enough for the GPU plans' 128 x 64 blocks, head dims 64 and 128) in fp16
and also compiles their bf16 twins (bf16 ``tl.dot`` does not run in the interpreter).
"""

from __future__ import annotations

import os

import pytest
import torch

import difattn
from difattn.testing import random_qkv

pytestmark = pytest.mark.interpreter

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records launches under TRITON_INTERPRET=1 (machines without CUDA)", allow_module_level=True)
triton = pytest.importorskip("triton")
pytest.importorskip("triton.runtime.interpreter")
from difattn.bench import static  # noqa: E402  (after the skip: it needs triton)


@pytest.fixture
def recorder():
    with static.LaunchRecorder() as launches:
        yield launches


# Production kernels at D <= 128 that may use mma.sync instead of wgmma on sm_90, and why. Everything else
# (attention kernels and the linear state/readout kernels) must use wgmma, and nothing may spill.
NO_WGMMA = {
    # GRAT's blocks are its groups: group (4, 4) gives 16-row tiles, below wgmma's 64-row minimum.
    ("grat", "_block_attention_fwd_kernel"), ("grat", "_block_attention_bwd_dq_kernel"),
    ("grat", "_block_attention_bwd_dkv_kernel"),
    # PISA's centroid backward takes its centroids in chunks of min(64, blocks rounded up to a power of two), at
    # least 16: the production grid (391 tokens, 7 blocks of 64) gives 16-row chunks; 64 blocks and more give 64.
    ("pisa-hybrid", "_pisa_bwd_centroid_kernel"), ("pisa-zeroth", "_pisa_bwd_centroid_kernel"),
    # DyDiLA's feature maps are elementwise (no matmul).
    ("dydila", "_features_kernel"), ("dydila", "_features_bwd_kernel"),
}


def _compile_all(launches: list[dict], targets: list[int]) -> dict:
    """Compiles every launch for every target in a subprocess without ``TRITON_INTERPRET``; fails on any error or
    shared-memory overflow. Returns the report: ``triton`` (the compiling version) and the ``records`` (see
    ``difattn.bench.static``)."""
    report = static.compile_records(launches, targets, python=os.environ.get("DIFATTN_AOT_PYTHON"))
    assert not report["failures"], "\n".join(report["failures"])
    assert len(report["records"]) == len(launches) * len(targets)
    too_big = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['smem_bytes']} bytes of shared memory"
               for r in report["records"] if r["smem_bytes"] > static.SHARED_LIMIT[r["arch"]]]
    assert not too_big, "\n".join(too_big)
    return report


@pytest.mark.parametrize("dtype, head_dim, targets", [
    (torch.float32, 24, [90]),
    (torch.float16, 72, [90, 80]),
], ids=["tiny-fp32", "tiny-fp16"])
def test_every_kernel_compiles_for_hopper_and_ampere(recorder, dtype, head_dim, targets):
    static.run_every_op(dtype, head_dim, static.SHAPES["tiny"], recorder)
    kernels = {launch["spec"]["name"] for launch in recorder.launches}
    assert len(kernels) >= 12, f"expected launches of every kernel, recorded {sorted(kernels)}"
    _compile_all(recorder.launches, targets)


def test_production_kernels_compile_without_spills_and_use_wgmma(recorder):
    """Production tiles at head dims 64 and 128, fp16 and bf16, compiled for sm_90 as launched: every kernel
    compiles and fits, none spills registers (with triton 3.6 through ``DIFATTN_AOT_PYTHON`` too), and every one
    with a matmul runs it on wgmma (except ``NO_WGMMA``)."""
    for head_dim in (64, 128):
        static.run_every_op(torch.float16, head_dim, static.SHAPES["production"], recorder)
    launches = static.with_bf16_twins(recorder.launches)
    assert len({launch["spec"]["name"] for launch in launches}) >= 12
    report = _compile_all(launches, [90])
    records = report["records"]
    label = lambda r: f"{r['kernel']} ({r['method']} {r['pass']}, D={r['D']}, {r['dtype']})"  # noqa: E731
    spills = [f"{label(r)}: {r['spill_bytes']} bytes spilled, {r['regs']} registers" for r in records
              if r["spill_bytes"] > 0]
    assert not spills, "\n".join(spills)
    no_wgmma = [f"{label(r)}: {r['mma_sync']} mma.sync" for r in records
                if r["wgmma"] == 0 and (r["method"], r["kernel"]) not in NO_WGMMA]
    assert not no_wgmma, "\n".join(no_wgmma)
    exceptions_used = {(r["method"], r["kernel"]) for r in records if r["wgmma"] == 0}
    assert exceptions_used == NO_WGMMA, f"stale NO_WGMMA entries: {sorted(NO_WGMMA - exceptions_used)}"


def test_block_engine_fits_ampere_at_head_dim_256(recorder):
    """Head dim 256 on production tiles: the block engine's forward and backward (64-query blocks for wide heads)
    fit an A100's shared memory as well as an H100's, in fp16 and bf16."""
    shapes = static.SHAPES["production"]
    grid = difattn.TokenGrid(*shapes["grid"][:2], text_tokens=shapes["grid"][2])
    q, k, v = random_qkv(1, 1, grid.num_tokens, 256, dtype=torch.float16, seed=4, requires_grad=True)
    difattn.clear_attention(q, k, v, grid, radius=shapes["radius"], backend="triton").float().sum().backward()
    launches = static.with_bf16_twins(recorder.launches)
    assert {launch["spec"]["name"] for launch in launches} == {
        "_block_attention_fwd_kernel", "_block_attention_bwd_dq_kernel", "_block_attention_bwd_dkv_kernel"}
    _compile_all(launches, [90, 80])
