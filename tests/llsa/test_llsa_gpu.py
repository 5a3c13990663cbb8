"""Tier 2 (CUDA only): the Triton LLSA kernels in bf16/fp16/fp32, on long sequences, the selection on the GPU
against the reference's, under torch.compile (fullgraph, one compiled kernel for two resolutions) and opcheck."""

import pytest
import torch

import difattn
from difattn import reference
from difattn.ops.llsa import op as llsa_op
from difattn.ops.llsa import plan as llsa_plan
from difattn.testing import compare_with_reference, random_qkv
from llsa_gathered import gathered_llsa

pytestmark = pytest.mark.gpu


def _check_against_reference(name, q, k, v, grid, block_size=16, topk=8, levels=None):
    _, indices = difattn.llsa_attention(q, k, v, block_size=block_size, topk=topk, levels=levels, grid=grid,
                                        return_indices=True)
    compare_with_reference(
        name,
        lambda q, k, v: difattn.llsa_attention(q, k, v, block_size=block_size, topk=topk, levels=levels, grid=grid),
        lambda q, k, v: reference.llsa_attention(q, k, v, block_size=block_size, topk=topk, levels=levels, grid=grid,
                                                 scale=q.shape[3] ** -0.5, indices=indices),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 72, 128])
def test_cuda_matches_reference(dtype, d):
    grid = difattn.TokenGrid(30, 52, text_tokens=77, text_position="last")
    q, k, v = random_qkv(2, 2, grid.num_tokens, d, dtype=dtype, device="cuda", seed=d, token_major=True)
    _check_against_reference("llsa cuda", q, k, v, grid)


@pytest.mark.parametrize("levels, topk", [(1, 8), (2, (8, 4)), (3, (4, 4, 2))])
def test_cuda_every_level_on_a_long_sequence(levels, topk):
    grid = difattn.TokenGrid(128, 128, text_tokens=64)  # 16448 tokens: ragged against 16**l
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=levels)
    _check_against_reference("llsa cuda long", q, k, v, grid, levels=levels, topk=topk)


def test_cuda_65536_tokens_at_the_default_levels_follow_the_reference():
    """65,536 tokens, block 16, top-8: the spec's default levels (2); forward and every gradient against the gathered
    twin given the same selection (the reference's dense mask and autograd graph would take ~200 GB here; the twin
    equals the reference in tier 0)."""
    q, k, v = random_qkv(1, 2, 256 * 256, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    _, indices = difattn.llsa_attention(q, k, v, return_indices=True)
    assert len(indices) == 2
    compare_with_reference(
        "llsa cuda 65536",
        lambda q, k, v: difattn.llsa_attention(q, k, v),
        lambda q, k, v: gathered_llsa(q, k, v, indices, 16, 64**-0.5),
        (q, k, v),
    )


def test_cuda_selection_equals_reference_with_exact_ties():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randint(-2, 3, (2, 2, 4096, 8), generator=gen).float().cuda() for _ in range(2))
    layout = llsa_plan.Layout(4096, 16, (8, 4))
    ours = llsa_plan.select(llsa_plan.pyramid(q, 16, 2, True), llsa_plan.pyramid(k, 16, 2, True), layout)
    _, expected = reference.llsa_attention(q, k, k, block_size=16, topk=(8, 4), levels=2, return_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_compile_fullgraph_and_one_kernel_for_two_resolutions():
    import torch._dynamo

    torch._dynamo.reset()
    grids = [difattn.TokenGrid(64, 64, text_tokens=64), difattn.TokenGrid(80, 72, text_tokens=64)]

    @torch.compile(fullgraph=True)
    def run(q, k, v, grid):
        return difattn.llsa_attention(q, k, v, grid=grid)

    for grid in grids:
        q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(run(q, k, v, grid), difattn.llsa_attention(q, k, v, grid=grid))
    from difattn.triton_kernels import llsa as tk

    assert len(tk._llsa_fwd_kernel.device_caches[torch.cuda.current_device()][0]) == 1


def test_opcheck_cuda():
    q, k, v = random_qkv(1, 2, 300, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    layout = llsa_plan.Layout(300, 16, (4, 4))
    key_levels = llsa_plan.pyramid(k, 16, 2, True)
    indices = llsa_plan.select(llsa_plan.pyramid(q, 16, 2, True), key_levels, layout)
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, "cuda")
    kp = llsa_plan.pooled(key_levels, k.dtype).detach().requires_grad_()
    vp = llsa_plan.pooled(llsa_plan.pyramid(v, 16, 2, True), v.dtype).detach().requires_grad_()
    torch.library.opcheck(llsa_op.llsa_fwd, (q, k, v, kp, vp, [fine, pooled, offsets, bias], 16, [4, 4], True, 0.125,
                                              "triton"))
