"""Tier 2 (CUDA only): the Triton block engine in bf16, on long sequences, under torch.compile, through opcheck,
and without recompiling when the sequence length changes."""

import pytest
import torch

import difattn
from difattn import reference
from difattn.ops.block.op import block_attention_fwd
from difattn.ops.block.plan import GPU_BLOCKS, clear_plan_key
from difattn.testing import assert_close, compare_with_reference, random_qkv

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


def text_heavy_qkv(grid, heads, d, *, seed):
    """bf16 CUDA q, k, v where the text keys take about half of every query's attention (a shared direction u in
    every query and text key adds ~3.2 to their logits) and carry values offset by +1: dropping the text keys, or
    any sizeable set of keys, moves outputs by ~0.5, far beyond bf16 rounding (random inputs alone give outputs of
    std ~0.01, which a wrong mask can pass)."""
    q, k, v = random_qkv(1, heads, grid.num_tokens, d, seed=seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(seed)), dim=0)
    text = slice(grid.text_range.start, grid.text_range.stop)
    q = q + 6.0 * u
    k[:, :, text] += 6.0 * u
    v[:, :, text] += 1.0
    return [x.to(device="cuda", dtype=torch.bfloat16) for x in (q, k, v)]


def test_long_sequence_window_covering_everything_equals_dense():
    grid = difattn.TokenGrid(128, 128, text_tokens=512)
    q, k, v = text_heavy_qkv(grid, 4, 128, seed=0)
    out = difattn.clear_attention(q, k, v, grid, radius=400.0)
    low = reference.dense_attention(q, k, v)
    high = reference.dense_attention(*(x.double() for x in (q, k, v)))
    assert_close("clear covering radius, 16,896 tokens", out, low, high)


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
