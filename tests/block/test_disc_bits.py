"""CLEAR's disc bits (what the Triton kernels test instead of distances): the plan's entries read through their
kinds and bits, in the CSR and in its transpose, give exactly the spec's mask, including bit 63 of a word, ragged
blocks, text on either side, frames and extra keys."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import difattn
from difattn import reference
from difattn.ops.block.disc_bits import MAX_KEY_BLOCK
from difattn.ops.block.plan import GPU_BLOCKS, GPU_BLOCKS_WIDE_HEADS, BlockShape, block_plan, clear_plan_key
from difattn.testing.strategies import disc_radii, token_grids

SMALL_BLOCKS = BlockShape((2, 4), (4, 2))
CPU = torch.device("cpu")


def _plan(grid, radius, temporal_radius, global_tokens, blocks):
    rt = float(grid.frames) if temporal_radius is None else temporal_radius
    return block_plan(clear_plan_key(grid, radius, rt, global_tokens, blocks), CPU)


def _pairs_read(plan, rows, cols, kinds):
    """Dense ``(N, N_k)`` count of the pairs that entries ``(rows[e], cols[e])`` of kind ``kinds[e]`` allow (full:
    every held slot; masked: the bits), in sequence order."""
    q_block, k_block = plan.max_blocks
    bits = plan.disc_bits.bits
    q_pos = plan.q_offsets[rows][:, None] + torch.arange(q_block)
    k_pos = plan.k_offsets[cols][:, None] + torch.arange(k_block)
    q_held = q_pos < plan.q_offsets[rows + 1][:, None]
    k_held = k_pos < plan.k_offsets[cols + 1][:, None]
    words = bits[(kinds - 1).clamp(min=0)]  # (entries, q slots)
    bit = ((words[:, :, None] >> torch.arange(k_block)) & 1) != 0
    allowed = torch.where((kinds == 0)[:, None, None], q_held[:, :, None] & k_held[:, None, :], bit)
    assert not (allowed & ~(q_held[:, :, None] & k_held[:, None, :])).any(), "bits set outside the blocks"
    dense = torch.zeros(plan.q_perm.numel(), plan.k_perm.numel(), dtype=torch.int64)
    e, a, b = torch.nonzero(allowed, as_tuple=True)
    dense.index_put_((plan.q_perm[q_pos[e, a]], plan.k_perm[k_pos[e, b]]), torch.ones_like(e), accumulate=True)
    return dense


def _check(grid, radius, temporal_radius=None, global_tokens=0, blocks=GPU_BLOCKS):
    plan = _plan(grid, radius, temporal_radius, global_tokens, blocks)
    mask = reference.clear_mask(grid, radius, temporal_radius=temporal_radius)
    image_rows = ~grid.is_text()  # text queries do not see the extra keys
    mask = torch.cat([mask, image_rows[:, None].expand(-1, global_tokens)], dim=1).long()
    disc = plan.disc_bits
    assert disc.kinds.dtype == disc.t_kinds.dtype == torch.int32 and disc.bits.dtype == torch.int64
    assert torch.equal(disc.kinds != 0, plan.kinds != 0) and torch.equal(disc.t_kinds != 0, plan.t_kinds != 0)
    rows = torch.repeat_interleave(torch.arange(plan.num_query_blocks), plan.indptr.diff())
    assert torch.equal(_pairs_read(plan, rows, plan.indices, disc.kinds), mask)
    t_cols = torch.repeat_interleave(torch.arange(plan.num_key_blocks), plan.t_indptr.diff())
    assert torch.equal(_pairs_read(plan, plan.t_indices, t_cols, disc.t_kinds), mask)
    return plan


@pytest.mark.parametrize("radius", [float(r) for r in range(1, 33)])
@pytest.mark.parametrize("text_position", ["first", "last"])
def test_disc_bits_equal_the_spec_mask_at_radii_1_to_32(radius, text_position):
    """A 45x37 grid with 9 text tokens (1674 tokens: no multiple of 128 or 64) on the GPU plan's 128x64 blocks."""
    _check(difattn.TokenGrid(45, 37, text_tokens=9, text_position=text_position), radius)


@given(grid=token_grids(max_side=17, max_text=150, max_tokens=500), radius=disc_radii(12.0),
       rt=st.sampled_from([None, 1.0, 2.0]), global_tokens=st.sampled_from([0, 3]),
       blocks=st.sampled_from([SMALL_BLOCKS, GPU_BLOCKS, GPU_BLOCKS_WIDE_HEADS]))
@example(grid=difattn.TokenGrid(5, 7, frames=3, text_tokens=3, text_position="last"), radius=3.0, rt=2.0,
         global_tokens=3, blocks=GPU_BLOCKS)
def test_disc_bits_equal_the_spec_mask(grid, radius, rt, global_tokens, blocks):
    _check(grid, radius, rt, global_tokens, blocks)


def test_disc_bits_use_the_sign_bit():
    """An 8x8 key tile's last slot is bit 63: the word's sign."""
    plan = _check(difattn.TokenGrid(24, 24, text_tokens=0), 3.0)
    assert plan.max_blocks[1] == MAX_KEY_BLOCK and bool((plan.disc_bits.bits < 0).any())


def test_disc_bits_refuse_key_blocks_wider_than_a_word():
    plan = _plan(difattn.TokenGrid(16, 16), 3.0, None, 0, BlockShape((8, 8), (8, 16)))
    with pytest.raises(ValueError, match="key blocks of 128 slots"):
        plan.disc_bits
