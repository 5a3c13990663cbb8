"""Tier 2 (CUDA only): the Triton PISA kernels in bf16/fp16 against the reference given the same blocks, on 32K
tokens, under torch.compile (fullgraph, dynamic shapes, no kernel recompile) and through opcheck."""

import pytest
import torch

import difattn
from difattn import reference
from difattn._options import pisa_routing_bias
from difattn.ops.pisa.method import pisa_on_kernels
from difattn.ops.pisa.op import pisa_fwd
from difattn.ops.pisa.layout import pisa_layout
from difattn.ops.pisa.stats import block_stats, pisa_stats, route
from difattn.testing import assert_close, compare_with_reference, random_qkv

pytestmark = pytest.mark.gpu


def triton_pisa(q, k, v, **options):
    options["routing_bias"] = pisa_routing_bias(options["routing_bias"])
    return pisa_on_kernels(q, k, v, backend="triton", **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
@pytest.mark.parametrize("order", ["zeroth", "hybrid"])
def test_pisa_cuda_matches_reference(dtype, d, order):
    grid = difattn.TokenGrid(30, 52, text_tokens=77, text_position="last")
    q, k, v = random_qkv(1, 2, grid.num_tokens, d, dtype=dtype, device="cuda", seed=d, token_major=True)
    kw = dict(density=0.125, block_size=64, order=order, routing_bias=True, sink="last", grid=grid, scale=d**-0.5)
    _, blocks = difattn.pisa_attention(q, k, v, return_blocks=True, **kw)
    compare_with_reference(
        f"pisa cuda {order}",
        lambda q, k, v: triton_pisa(q, k, v, blocks=blocks, return_blocks=False, **kw),
        lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, **kw),
        (q, k, v),
    )


def test_32k_tokens_density_one_equals_dense():
    """Queries scaled x3 make each one's attention peaked on a few hundred keys, so a block the kernel skipped or
    approximated (e.g. every 10th) moves outputs far beyond bf16 rounding; random inputs alone average over all
    32K keys to outputs of std ~0.006, which such a bug passes."""
    grid = difattn.TokenGrid(128, 256)  # 32768 tokens
    q, k, v = random_qkv(1, 2, grid.num_tokens, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    q = (3.0 * q.float()).to(torch.bfloat16)
    low = reference.dense_attention(q, k, v)
    high = reference.dense_attention(*(x.double() for x in (q, k, v)))
    for order in ("zeroth", "hybrid"):
        out = difattn.pisa_attention(q, k, v, density=1.0, grid=grid, order=order)
        assert_close(f"pisa density 1 {order}, 32,768 tokens", out, low, high)


def test_32k_tokens_forward_and_backward_follow_the_reference():
    """One head (the float64 reference's autograd graph at 33K tokens takes ~20 GB)."""
    grid = difattn.TokenGrid(128, 256, text_tokens=512)
    q, k, v = random_qkv(1, 1, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    kw = dict(density=0.125, block_size=64, order="hybrid", routing_bias=False, sink=None, grid=grid, scale=0.125)
    _, blocks = difattn.pisa_attention(q, k, v, return_blocks=True, **kw)
    compare_with_reference(
        "pisa 33,280 tokens",
        lambda q, k, v: triton_pisa(q, k, v, blocks=blocks, return_blocks=False, **kw),
        lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, **kw),
        (q, k, v),
    )


def test_compile_fullgraph_and_no_recompile():
    import torch._dynamo

    torch._dynamo.reset()
    grids = [difattn.TokenGrid(32, 32, text_tokens=64), difattn.TokenGrid(48, 40, text_tokens=64)]

    @torch.compile(fullgraph=True, dynamic=True)
    def run(q, k, v, grid):
        return difattn.pisa_attention(q, k, v, grid=grid, routing_bias=True)

    for grid in grids:
        q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(run(q, k, v, grid), difattn.pisa_attention(q, k, v, grid=grid, routing_bias=True))
    from difattn.triton_kernels import pisa as tk

    # One compiled variant of the forward kernel served both sequence lengths.
    assert len(tk._pisa_fwd_kernel.device_caches[torch.cuda.current_device()][0]) == 1


@pytest.mark.parametrize("hybrid", [False, True])
def test_opcheck_cuda(hybrid):
    grid = difattn.TokenGrid(12, 20, text_tokens=5)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda")
    layout = pisa_layout(grid, grid.num_tokens, 64, "cuda")
    key_mean, value_mean, moment_mean, query_mean, _ = block_stats(q, k, v, layout, moments=True, bias=None,
                                                                   backend="triton")
    blocks = route(query_mean, key_mean, 0.125, 2, sink="first")
    args = [x.detach().requires_grad_() for x in (q, k, v, key_mean, value_mean, moment_mean)]
    if not hybrid:
        args[5] = None
    torch.library.opcheck(
        pisa_fwd, (*args, layout.perm, layout.offsets, blocks, layout.max_block, 0.125, "triton")
    )
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(pisa_stats, (*leaves, layout.perm, layout.offsets, layout.block_of, layout.slots,
                                       layout.max_block, True, hybrid, "triton"))
