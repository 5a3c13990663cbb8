"""Tier 2 (CUDA only): the Triton block engine in bf16, on long sequences, under torch.compile, through opcheck,
and without recompiling when the sequence length changes."""

import pytest
import torch

import difattn
from difattn import reference
from difattn.ops.block.op import block_attention_fwd
from difattn.ops.block.plan import GPU_BLOCKS, clear_plan_key
from difattn.testing import compare_with_reference, random_qkv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128, 256])
def test_clear_grat_cuda_match_reference(dtype, d):
    grid = difattn.TokenGrid(30, 52, text_tokens=77, text_position="last")
    q, k, v = random_qkv(1, 2, grid.num_tokens, d, dtype=dtype, device="cuda", seed=d, token_major=True)
    compare_with_reference(
        "clear cuda",
        lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=8.0),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=8.0, scale=d**-0.5),
        (q, k, v),
    )
    compare_with_reference(
        "grat cuda",
        lambda q, k, v: difattn.grat_attention(q, k, v, grid, group=(8, 16), pattern="criss_cross"),
        lambda q, k, v: reference.grat_attention(q, k, v, grid, group=(8, 16), pattern="criss_cross", scale=d**-0.5),
        (q, k, v),
    )


def test_long_sequence_window_covering_everything_equals_sdpa():
    grid = difattn.TokenGrid(128, 128, text_tokens=512)
    q, k, v = random_qkv(1, 4, grid.num_tokens, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = difattn.clear_attention(q, k, v, grid, radius=400.0)
    assert (out.float() - dense.float()).abs().max() < 2e-2


def test_compile_fullgraph_and_no_recompile():
    import torch._dynamo

    torch._dynamo.reset()
    grids = [difattn.TokenGrid(32, 32, text_tokens=64), difattn.TokenGrid(48, 40, text_tokens=64)]

    @torch.compile(fullgraph=True, dynamic=True)
    def run(q, k, v, grid):
        return difattn.clear_attention(q, k, v, grid, radius=6.0)

    for grid in grids:
        q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(run(q, k, v, grid), difattn.clear_attention(q, k, v, grid, radius=6.0))
    from difattn.triton_kernels import block_attention as tk

    # One compiled variant of the forward kernel served both sequence lengths.
    assert len(tk._block_attention_fwd_kernel.device_caches[torch.cuda.current_device()][0]) == 1


def test_opcheck_cuda():
    grid = difattn.TokenGrid(12, 20, text_tokens=5)
    key = clear_plan_key(grid, 3.0, 1.0, 0, GPU_BLOCKS)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    torch.library.opcheck(block_attention_fwd, (q, k, v, None, *key.op_args(), 0.125, "triton"))
