"""The LLSA reference against a literal reading of the LLSA paper's algorithm (pooled tokens, selection and key lists
built token by token in float64), plus its exactness properties, gradients at every level and the Z-order layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import difattn
from difattn._options import llsa_config
from difattn.grid import TokenGrid
from difattn.reference._dense import dense_attention, masked_attention
from difattn.reference.llsa import llsa_attention
from difattn.testing import random_qkv, rel_error
from difattn.testing.strategies import token_grids
from llsa_brute import brute_llsa_batched, brute_select, brute_zorder
from llsa_gathered import gathered_llsa

RAGGED = [(1, (3,)), (2, (3, 2)), (3, (2, 3, 1))]  # (L, (K_1, ..., K_L)) at N = 37, block 4: n = 37, 10, 3, 1


def close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-11)


@st.composite
def configs(draw, max_tokens: int = 150):
    """``(grid or None, N, block_size, levels, topks)`` accepted by llsa_config, ragged N included."""
    grid = draw(st.none() | token_grids(max_side=12, max_frames=2, max_text=100, max_tokens=max_tokens))
    num_tokens = grid.num_tokens if grid is not None else draw(st.integers(2, max_tokens))
    block_size = draw(st.integers(2, 5))
    levels = draw(st.integers(1, 3))
    topks = tuple(draw(st.integers(1, 4)) for _ in range(levels))
    try:
        llsa_config(num_tokens, block_size, topks, levels)
    except ValueError:
        assume(False)
    return grid, num_tokens, block_size, levels, topks


@settings(max_examples=20, deadline=None)
@given(config=configs(), seed=st.integers(0, 2**16))
@example(config=(None, 300, 16, 1, (8,)), seed=0)  # the paper's block 16 and top-8 (the last block ragged)
@example(config=(TokenGrid(9, 14, text_tokens=40), 166, 4, 2, (3, 2)), seed=1)  # text blocks at the end
def test_matches_brute_force(config, seed):
    grid, num_tokens, block_size, levels, topks = config
    q, k, v = random_qkv(1, 2, num_tokens, 6, Dv=5, dtype=torch.float64, seed=seed)
    out, indices = llsa_attention(q, k, v, block_size=block_size, topk=topks, levels=levels, grid=grid,
                                  return_indices=True, scale=0.3)
    close64(out, brute_llsa_batched(q, k, v, block_size, indices, 0.3, grid))


@settings(max_examples=25, deadline=None)
@given(config=configs(max_tokens=300), seed=st.integers(0, 2**16))
@example(config=(None, 300, 16, 1, (8,)), seed=2)
def test_selection_matches_brute_force(config, seed):
    grid, num_tokens, block_size, levels, topks = config
    q, k, v = random_qkv(2, 2, num_tokens, 6, dtype=torch.float64, seed=seed)
    _, indices = llsa_attention(q, k, v, block_size=block_size, topk=topks, levels=levels, grid=grid,
                                return_indices=True)
    order = list(range(num_tokens)) if grid is None else brute_zorder(grid)
    assert [ids.shape for ids in indices] == [
        (2, 2, -(-num_tokens // block_size**level), kk) for level, kk in enumerate(topks, 1)
    ]
    for b in range(2):
        for h in range(2):
            expected = brute_select(q[b, h, order], k[b, h, order], block_size, topks)
            assert [ids[b, h].tolist() for ids in indices] == expected


@pytest.mark.parametrize("levels, topks", RAGGED)
def test_ragged_levels_match_brute_force_with_gradients(levels, topks):
    q, k, v = random_qkv(2, 1, 37, 5, Dv=3, dtype=torch.float64, seed=levels, requires_grad=True)
    out, indices = llsa_attention(q, k, v, block_size=4, topk=topks, levels=levels, return_indices=True)
    expected = brute_llsa_batched(q, k, v, 4, indices, 5**-0.5)
    close64(out, expected)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, actual, wanted in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-11, msg=f"d{name}")


def test_gradcheck_two_levels():
    q, k, v = random_qkv(1, 1, 11, 3, Dv=2, dtype=torch.float64, seed=3, requires_grad=True)
    _, indices = llsa_attention(q, k, v, block_size=2, topk=(2, 2), levels=2, return_indices=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: llsa_attention(q, k, v, block_size=2, topk=(2, 2), levels=2, indices=indices), (q, k, v)
    )


def test_all_blocks_one_level_is_attention_over_fine_and_pooled_tokens():
    q, k, v = random_qkv(1, 2, 37, 6, dtype=torch.float64, seed=4)
    out = llsa_attention(q, k, v, block_size=4, topk=10, levels=1)
    pooled_k = torch.stack([k[:, :, s : s + 4].mean(2) for s in range(0, 37, 4)], dim=2)
    pooled_v = torch.stack([v[:, :, s : s + 4].mean(2) for s in range(0, 37, 4)], dim=2)
    bias = torch.tensor([0.0] * 37 + [math.log(4)] * 9 + [0.0], dtype=torch.float64)[None]
    expected = masked_attention(q, torch.cat([k, pooled_k], 2), torch.cat([v, pooled_v], 2), scale=6**-0.5, bias=bias)
    close64(out, expected)


@pytest.mark.parametrize("levels, topks", [(1, 10), (2, (10, 3)), (3, (10, 3, 1))])
def test_all_blocks_with_keys_constant_over_coarse_spans_is_dense(levels, topks):
    # Every fine token is then present L + 1 times at equal logits (fine, and inside one token per level). Exact
    # with "tokens" pooling, whose pooled value times its count is the sum of the fine values under it at every
    # level; "children" pooling (the short last level-1 token counts as much as a full one) is not, for N = 37.
    q, _, v = random_qkv(1, 2, 37, 6, dtype=torch.float64, seed=5)
    span = 4**levels
    centres = torch.randn(1, 2, -(-37 // span), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    k = centres.repeat_interleave(span, dim=2)[:, :, :37]
    out = llsa_attention(q, k, v, block_size=4, topk=topks, levels=levels, coarse_pooling="tokens")
    close64(out, dense_attention(q, k, v))
    if levels > 1:
        children = llsa_attention(q, k, v, block_size=4, topk=topks, levels=levels, coarse_pooling="children")
        assert rel_error(children, out) > 1e-3


def test_selection_ties_go_to_the_lower_id():
    # Level-1 scores a_c (q = 1, keys constant per block): parents score 1.25, 0, 5, 0, so I_2 = [2, 0] and the
    # candidates 8..11 and 0 tie at 5; the lower ids win over the order in which the parents were chosen.
    scores = [5.0, 0, 0, 0] + [0.0] * 4 + [5.0] * 4 + [0.0] * 4
    k = torch.tensor(scores, dtype=torch.float64).repeat_interleave(4).reshape(1, 1, 64, 1)
    q = torch.ones_like(k)
    _, (fine, coarse) = llsa_attention(q, k, k, block_size=4, topk=(3, 2), levels=2, return_indices=True)
    assert coarse[0, 0].tolist() == [[2, 0]] * 4
    assert fine[0, 0].tolist() == [[0, 8, 9]] * 16
    _, (fine,) = llsa_attention(q, torch.ones_like(k), k, block_size=4, topk=3, levels=1, return_indices=True)
    assert fine[0, 0].tolist() == [[0, 1, 2]] * 16


def test_zorder_blocks_are_squares_and_text_stays_last():
    grid = TokenGrid(8, 8, text_tokens=5, text_position="last")  # blocks of 16: four 4x4 quadrants, then text
    q = torch.ones(1, 2, grid.num_tokens, 4, dtype=torch.float64)
    k = torch.full_like(q, 0.5)
    y, x = torch.arange(64) // 8, torch.arange(64) % 8
    k[0, 0, :64][(y < 4) & (x >= 4)] = 3.0  # head 0: the top-right quadrant, Z-order block 1
    k[0, 1, 64:] = 3.0  # head 1: the text
    _, (fine,) = llsa_attention(q, k, k, block_size=16, topk=1, levels=1, grid=grid, return_indices=True)
    assert fine[0, 0].flatten().tolist() == [1] * 5
    assert fine[0, 1].flatten().tolist() == [4] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_follows_float64(dtype):
    grid = TokenGrid(9, 11, text_tokens=7)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, dtype=torch.float64, seed=7, token_major=True)
    high, indices = llsa_attention(q, k, v, block_size=4, topk=3, levels=2, grid=grid, return_indices=True)
    low = llsa_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=4, topk=3, levels=2, grid=grid,
                         indices=indices)
    assert low.dtype == dtype and low.shape == high.shape
    assert rel_error(low, high) < {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def test_bad_topk_and_indices_are_rejected():
    q, k, v = random_qkv(1, 2, 37, 4, seed=8)
    with pytest.raises(ValueError, match="topk"):
        llsa_attention(q, k, v, block_size=4, topk=11, levels=1)
    with pytest.raises(ValueError, match="topk"):
        llsa_attention(q, k, v, block_size=4, topk=(9, 2), levels=2)  # only 4 + 4 or 4 + 2 candidates
    _, indices = llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, return_indices=True)
    llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, indices=indices)
    with pytest.raises(ValueError, match="indices"):
        llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, indices=[indices[0][..., :2], indices[1]])
    with pytest.raises(ValueError, match="indices"):
        llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, indices=[indices[0], indices[1] + 3])
    with pytest.raises(TypeError, match="indices"):
        llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, indices=indices[:1])


# The paper's default levels (block 16: L = 1 up to 16 * 256 tokens, 2 up to 16**2 * 256, ...), just around each
# boundary too: the smallest L >= 1 with N / 16**L <= 256.
SPEC_LEVELS = [(4095, 1), (4096, 1), (4097, 2), (16384, 2), (65535, 2), (65536, 2), (65537, 3), (262144, 3),
               (1048576, 3), (1048577, 4)]


@pytest.mark.parametrize("num_tokens, levels", SPEC_LEVELS)
def test_default_levels_are_the_spec_values(num_tokens, levels):
    assert llsa_config(num_tokens, 16, 8, None) == (levels, (8,) * levels)


@pytest.mark.parametrize("num_tokens, levels", [(512, 1), (513, 2), (1024, 2), (1025, 3)])
def test_default_levels_reach_the_attention(num_tokens, levels):
    """Block 2: 256 coarse tokens at most, so 512 tokens keep one level and 513 need two (the public function and
    the reference resolve the default the same way)."""
    q, k, v = random_qkv(1, 1, num_tokens, 4, seed=num_tokens)
    _, indices = llsa_attention(q, k, v, block_size=2, topk=2, return_indices=True)
    _, ours = difattn.llsa_attention(q, k, v, block_size=2, topk=2, return_indices=True)
    assert len(indices) == len(ours) == levels


@pytest.mark.parametrize("num_tokens, block_size, topks", [(1100, 16, (8, 4)), (300, 16, (8,)), (70, 3, (2, 2, 1))])
def test_gathered_twin_equals_the_reference(num_tokens, block_size, topks):
    """The gathered twin the 65,536-token GPU test compares against equals the reference, forward and gradients."""
    q, k, v = random_qkv(1, 2, num_tokens, 8, Dv=5, dtype=torch.float64, seed=num_tokens, requires_grad=True)
    out, indices = llsa_attention(q, k, v, block_size=block_size, topk=topks, levels=len(topks), scale=0.3,
                                  return_indices=True)
    twin = gathered_llsa(q, k, v, indices, block_size, 0.3)
    close64(twin, out)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(twin, (q, k, v), dout), torch.autograd.grad(out, (q, k, v), dout)):
        close64(a, b)
