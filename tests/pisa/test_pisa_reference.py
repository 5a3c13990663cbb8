"""The PISA reference against a literal, loop-by-loop reading of the PISA paper's equations (float64), plus its
exactness properties, routing rules and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from difattn.grid import TokenGrid
from difattn.reference._dense import dense_attention
from difattn.reference.pisa import pisa_attention, pisa_layout
from difattn.testing import random_qkv, rel_error
from difattn.testing.strategies import token_grids
from pisa_brute import brute_layout, brute_pisa_batched, brute_route

ORDERS = ("zeroth", "hybrid", "first")
GRIDS = {
    "none": None,
    "text_first": TokenGrid(5, 7, text_tokens=11, text_position="first"),
    "text_last_video": TokenGrid(3, 6, frames=2, text_tokens=5, text_position="last"),
}


def block_constant_keys(layout, num_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """``(1, 2, N, D)`` float64 keys constant over every block of ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.empty(1, 2, num_tokens, dim, dtype=torch.float64)
    for idx in layout:
        keys[:, :, idx] = torch.randn(1, 2, 1, dim, generator=gen, dtype=torch.float64)
    return keys


def close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-11)


@st.composite
def layouts(draw, max_tokens: int = 160):
    """``(grid or None, N, block_size)`` with odd grids, text on either side, N not a multiple of the block."""
    block_size = draw(st.sampled_from([4, 8, 16]))
    grid = draw(st.none() | token_grids(max_side=13, max_frames=2, max_text=100, max_tokens=max_tokens))
    num_tokens = grid.num_tokens if grid is not None else draw(st.integers(1, max_tokens))
    return grid, num_tokens, block_size


@pytest.mark.parametrize("block_size", [4, 8, 16, 64, 128])
@pytest.mark.parametrize("grid", [TokenGrid(13, 45, frames=2, text_tokens=70), TokenGrid(30, 52, text_tokens=9,
                                                                                          text_position="last")])
def test_layout_matches_spec(grid, block_size):
    perm, sizes = pisa_layout(grid, grid.num_tokens, block_size)
    layout = brute_layout(grid, grid.num_tokens, block_size)
    assert sizes.tolist() == [len(idx) for idx in layout]
    assert perm.tolist() == [t for idx in layout for t in idx]


@settings(max_examples=20, deadline=None)
@given(shape=layouts(), order=st.sampled_from(ORDERS), density=st.sampled_from([0.1, 0.3, 0.5]),
       sink=st.sampled_from([None, "first", "last"]), seed=st.integers(0, 2**16))
# Block 128 (8x16 image tiles, border tiles smaller, one text block); density x M = 0.5 rounding down to k = 1 with
# the last block as sink (it takes the only place); several text blocks, text last, the last one partial.
@example(shape=(TokenGrid(10, 20, text_tokens=40), 240, 128), order="hybrid", density=0.5, sink=None, seed=0)
@example(shape=(None, 150, 16), order="first", density=0.05, sink="last", seed=1)
@example(shape=(TokenGrid(5, 6, text_tokens=100, text_position="last"), 130, 16), order="zeroth", density=0.3,
         sink="first", seed=2)
def test_matches_brute_force(shape, order, density, sink, seed):
    grid, num_tokens, block_size = shape
    q, k, v = random_qkv(1, 2, num_tokens, 8, Dv=6, dtype=torch.float64, seed=seed)
    out, blocks = pisa_attention(q, k, v, density=density, block_size=block_size, order=order, sink=sink,
                                 grid=grid, return_blocks=True, scale=0.4)
    layout = brute_layout(grid, num_tokens, block_size)
    close64(out, brute_pisa_batched(q, k, v, layout, blocks, 0.4, order))


@settings(max_examples=25, deadline=None)
@given(shape=layouts(), density=st.sampled_from([0.05, 0.2, 0.5, 1.0]),
       routing_bias=st.sampled_from([False, True, "centered", "uncentered", "key_variance"]),
       sink=st.sampled_from([None, "first", "last"]), seed=st.integers(0, 2**16))
@example(shape=(TokenGrid(7, 9, frames=2, text_tokens=20), 146, 8), density=1.0, routing_bias=True, sink="last",
         seed=3)
def test_selection_matches_brute_force_routing(shape, density, routing_bias, sink, seed):
    grid, num_tokens, block_size = shape
    q, k, v = random_qkv(2, 2, num_tokens, 8, Dv=6, dtype=torch.float64, seed=seed)
    _, blocks = pisa_attention(q, k, v, density=density, block_size=block_size, routing_bias=routing_bias,
                               sink=sink, grid=grid, return_blocks=True)
    layout = brute_layout(grid, num_tokens, block_size)
    num_selected = max(1, math.floor(density * len(layout)))
    assert blocks.dtype == torch.int64
    assert blocks.shape == (2, 2, len(layout), num_selected)
    for b in range(2):
        for h in range(2):
            expected = brute_route(q[b, h], k[b, h], v[b, h], layout, 8**-0.5, num_selected, routing_bias, sink)
            assert blocks[b, h].tolist() == expected


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("order", ORDERS)
def test_density_one_is_dense(grid, order):
    num_tokens = grid.num_tokens if grid is not None else 77
    q, k, v = random_qkv(1, 2, num_tokens, 8, Dv=5, dtype=torch.float64, seed=1)
    out = pisa_attention(q, k, v, density=1.0, block_size=8, order=order, grid=grid, routing_bias=True)
    close64(out, dense_attention(q, k, v))


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("order", ORDERS)
def test_block_constant_keys_are_dense(grid, order):
    num_tokens = grid.num_tokens if grid is not None else 77
    q, _, v = random_qkv(1, 2, num_tokens, 8, dtype=torch.float64, seed=2)
    k = block_constant_keys(brute_layout(grid, num_tokens, 8), num_tokens, 8, seed=3)
    out = pisa_attention(q, k, v, density=0.2, block_size=8, order=order, grid=grid, sink="last")
    close64(out, dense_attention(q, k, v))


@pytest.mark.parametrize("order, power", [("zeroth", 1), ("first", 2)])
def test_error_shrinks_like_taylor_order(order, power):
    num_tokens, block_size = 128, 16
    q, noise, v = random_qkv(1, 2, num_tokens, 16, dtype=torch.float64, seed=4)
    centres = block_constant_keys(brute_layout(None, num_tokens, block_size), num_tokens, 16, seed=5)
    _, blocks = pisa_attention(q, centres, v, density=0.25, block_size=block_size, return_blocks=True)
    errors = []
    for eps in (1e-2, 2.5e-3):
        k = centres + eps * noise
        out = pisa_attention(q, k, v, density=0.25, block_size=block_size, order=order, blocks=blocks)
        errors.append(float((out - dense_attention(q, k, v)).abs().max()))
    assert errors[0] / errors[1] == pytest.approx(4**power, rel=0.2)


def tied_keys(levels: list[float], block_size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and block-constant k (float64, exact binary fractions) with routing score ∝ ``levels[j]`` for block j."""
    keys = torch.tensor(levels, dtype=torch.float64).repeat_interleave(block_size)[:, None] * 0.5
    k = keys.expand(-1, dim).reshape(1, 1, -1, dim).contiguous()
    return torch.full_like(k, 0.25), k


@pytest.mark.parametrize("sink, expected", [(None, [2, 3, 5, 4]), ("first", [0, 2, 3, 5]), ("last", [7, 2, 3, 5])])
def test_routing_ties_go_to_lower_block_and_sink_takes_a_place(sink, expected):
    q, k = tied_keys([-5, 1, 3, 3, 2, 3, 1, -1], block_size=4, dim=4)
    _, blocks = pisa_attention(q, k, k, density=0.5, block_size=4, sink=sink, return_blocks=True)
    assert blocks[0, 0].tolist() == [expected] * 8


def test_all_equal_scores_select_lowest_blocks():
    q, k = tied_keys([2.0] * 6, block_size=4, dim=4)
    _, blocks = pisa_attention(q, k, k, density=0.5, block_size=4, return_blocks=True)
    assert blocks[0, 0].tolist() == [[0, 1, 2]] * 6


@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_with_fixed_blocks(order):
    q, k, v = random_qkv(1, 1, 10, 3, Dv=2, dtype=torch.float64, seed=6, requires_grad=True)
    blocks = torch.tensor([[[[0]], [[2]], [[1]]]]).reshape(1, 1, 3, 1)
    assert torch.autograd.gradcheck(
        lambda q, k, v: pisa_attention(q, k, v, density=0.34, block_size=4, order=order, blocks=blocks), (q, k, v)
    )


@pytest.mark.parametrize("order", ORDERS)
def test_gradients_match_brute_force(order):
    grid = TokenGrid(3, 5, text_tokens=6, text_position="last")
    q, k, v = random_qkv(1, 2, grid.num_tokens, 4, Dv=3, dtype=torch.float64, seed=7, requires_grad=True)
    out, blocks = pisa_attention(q, k, v, density=0.4, block_size=4, order=order, grid=grid, return_blocks=True)
    expected = brute_pisa_batched(q, k, v, brute_layout(grid, grid.num_tokens, 4), blocks, 0.5, order)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, actual, wanted in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_follows_float64(dtype):
    grid = TokenGrid(6, 10, text_tokens=9)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, dtype=torch.float64, seed=8, token_major=True)
    high, blocks = pisa_attention(q, k, v, density=0.3, block_size=8, grid=grid, return_blocks=True)
    low = pisa_attention(q.to(dtype), k.to(dtype), v.to(dtype), density=0.3, block_size=8, grid=grid, blocks=blocks)
    assert low.dtype == dtype and low.shape == high.shape
    assert rel_error(low, high) < {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def test_bad_blocks_are_rejected():
    q, k, v = random_qkv(1, 2, 20, 4, seed=9)  # block_size 4: M = 5, density 0.4: k = 2
    good = torch.zeros(1, 2, 5, 2, dtype=torch.int64)
    good[..., 1] = 1
    pisa_attention(q, k, v, density=0.4, block_size=4, blocks=good)
    with pytest.raises(ValueError, match="blocks"):
        pisa_attention(q, k, v, density=0.4, block_size=4, blocks=good[..., :1])
    with pytest.raises(ValueError, match="blocks"):
        pisa_attention(q, k, v, density=0.4, block_size=4, blocks=good + 4)
    with pytest.raises(ValueError, match="blocks"):
        pisa_attention(q, k, v, density=0.4, block_size=4, blocks=torch.zeros_like(good))
    with pytest.raises(TypeError, match="blocks"):
        pisa_attention(q, k, v, density=0.4, block_size=4, blocks=good.int())


def test_untileable_block_size_with_grid_is_rejected():
    grid = TokenGrid(6, 6)
    q, k, v = random_qkv(1, 1, grid.num_tokens, 4, seed=10)
    with pytest.raises(ValueError, match="block_size"):
        pisa_attention(q, k, v, block_size=18, grid=grid)
