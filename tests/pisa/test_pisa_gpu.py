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
from difattn.testing import compare_with_reference, random_qkv, rel_error

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


def test_32k_tokens_density_one_equals_sdpa():
    grid = difattn.TokenGrid(128, 256)  # 32768 tokens
    q, k, v = random_qkv(1, 4, grid.num_tokens, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for order in ("zeroth", "hybrid"):
        out = difattn.pisa_attention(q, k, v, density=1.0, grid=grid, order=order)
        assert (out.float() - dense.float()).abs().max() < 2e-2


def test_32k_tokens_forward_and_backward_follow_the_reference():
    grid = difattn.TokenGrid(128, 256, text_tokens=512)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=1, requires_grad=True)
    out, blocks = difattn.pisa_attention(q, k, v, grid=grid, return_blocks=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    high = [x.detach().float().requires_grad_() for x in (q, k, v)]
    expected = reference.pisa_attention(*high, grid=grid, blocks=blocks)
    expected_grads = torch.autograd.grad(expected, high, dout.float())
    assert rel_error(out, expected) < 1e-2
    for name, g, e in zip("qkv", grads, expected_grads):
        assert rel_error(g, e) < 3e-2, name


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
