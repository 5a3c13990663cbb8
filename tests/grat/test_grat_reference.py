"""The GRAT reference against brute force written literally from the paper's mask rules, plus exactness
properties, the check values of the paper's settings and finite-difference gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from brute_force import assert_float64_equal, brute_attention, brute_grat_mask
from difattn.grid import TokenGrid
from difattn.reference.grat import grat_attention, grat_mask
from difattn.testing import random_qkv
from difattn.testing.strategies import token_grids
from hypothesis import given, settings
from hypothesis import strategies as st

MASK_SETTINGS = settings(max_examples=250, deadline=None)
ATTENTION_SETTINGS = settings(max_examples=25, deadline=None)

small_grids = token_grids(max_side=9, max_frames=3, max_text=8, max_tokens=120)
groups = st.one_of(
    st.none(),
    st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
)
patterns = st.sampled_from(["neighbors", "criss_cross"])


def sdpa64(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def axis_pairs(side: int, group: int, keep) -> int:
    """Token pairs along one axis whose group offset ``|Δ|`` satisfies ``keep`` (border groups are smaller)."""
    starts = torch.arange(0, side, group)
    sizes = (starts + group).clamp(max=side) - starts
    offsets = (torch.arange(len(sizes))[:, None] - torch.arange(len(sizes))[None, :]).abs()
    return int((sizes[:, None] * sizes[None, :] * keep(offsets)).sum())


def grat_image_pairs(height: int, width: int, group: tuple[int, int], pattern: str, reach: int) -> int:
    """Allowed image-image pairs on one frame, axis by axis (the 2-D rules factor over y and x)."""
    if pattern == "neighbors":
        return axis_pairs(height, group[0], lambda d: d <= reach) * axis_pairs(width, group[1], lambda d: d <= reach)
    same_row = axis_pairs(height, group[0], lambda d: d == 0)
    same_col = axis_pairs(width, group[1], lambda d: d == 0)
    return same_row * width**2 + height**2 * same_col - same_row * same_col


def image_query_sparsity(height: int, width: int, text: int, image_pairs: int) -> float:
    image = height * width
    return 1 - (image_pairs + image * text) / (image * (image + text))


@MASK_SETTINGS
@given(grid=small_grids, group=groups, pattern=patterns, reach=st.integers(0, 2), data=st.data())
def test_grat_mask_is_the_spec_rule(grid, group, pattern, reach, data):
    text_mask = None
    if data.draw(st.booleans(), label="with text_mask"):
        bits = data.draw(st.lists(st.booleans(), min_size=2 * grid.text_tokens, max_size=2 * grid.text_tokens))
        text_mask = torch.tensor(bits, dtype=torch.bool).reshape(2, grid.text_tokens)
    mask = grat_mask(grid, group, pattern, reach, text_mask)
    expected = brute_grat_mask(grid, group, pattern, reach, text_mask)
    assert torch.equal(mask, expected[0] if text_mask is None else expected[:, None])


def test_grat_criss_cross_single_frame_is_a_cross():
    grid = TokenGrid(6, 6)
    row = grat_mask(grid, (2, 2), "criss_cross", 1)[2 * 6 + 3].reshape(6, 6)  # token (y=2, x=3): group (1, 1)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2:4, :] = True
    expected[:, 2:4] = True
    assert torch.equal(row, expected)


@ATTENTION_SETTINGS
@given(grid=small_grids, group=groups, pattern=patterns, reach=st.integers(0, 2), seed=st.integers(0, 99))
def test_grat_attention_matches_brute_force(grid, group, pattern, reach, seed):
    q, k, v = random_qkv(2, 2, grid.num_tokens, 16, dtype=torch.float64, seed=seed)
    text_mask = torch.rand(2, grid.text_tokens, generator=torch.Generator().manual_seed(seed)) < 0.6
    out = grat_attention(q, k, v, grid, group=group, pattern=pattern, reach=reach, text_mask=text_mask)
    allowed = brute_grat_mask(grid, group, pattern, reach, text_mask)
    assert_float64_equal(out, brute_attention(q, k, v, allowed, 16**-0.5))


@ATTENTION_SETTINGS
@given(grid=small_grids, pattern=patterns, extra=st.integers(0, 3))
def test_grat_covering_group_is_dense(grid, pattern, extra):
    group = (grid.frames + extra, grid.height + extra, grid.width)
    assert grat_mask(grid, group, pattern, 0).all()
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.float64)
    assert_float64_equal(grat_attention(q, k, v, grid, group=group, pattern=pattern, reach=0), sdpa64(q, k, v))


@MASK_SETTINGS
@given(grid=small_grids, group=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)))
def test_grat_neighbors_with_covering_reach_is_dense(grid, group):
    gt, gh, gw = group
    reach = max(-(-grid.frames // gt), -(-grid.height // gh), -(-grid.width // gw)) - 1
    assert grat_mask(grid, group, "neighbors", reach).all()


@MASK_SETTINGS
@given(grid=small_grids, gt=st.integers(1, 3), gh=st.integers(1, 4), full_rows=st.booleans())
def test_grat_criss_cross_with_a_full_band_is_dense(grid, gt, gh, full_rows):
    # A group spanning the whole width (or height) puts every pair of tokens in the same column (row) band.
    group = (gt, gh, grid.width) if full_rows else (gt, grid.height, gh)
    assert grat_mask(grid, group, "criss_cross", 0).all()


def test_grat_text_mask_drops_padded_keys_only():
    grid = TokenGrid(4, 4, text_tokens=3, text_position="last")
    text_mask = torch.tensor([[True, False, True], [False, False, False]])
    mask = grat_mask(grid, (2, 2), "neighbors", 0, text_mask)[:, 0]
    text_keys = mask[:, :, 16:]
    assert torch.equal(text_keys, text_mask[:, None, :].expand(-1, grid.num_tokens, -1))
    assert mask[:, 16:, :16].all()  # padded text queries still see every image key


def test_grat_flux_8k_sparsity_check_values():
    criss_cross = grat_image_pairs(512, 512, (16, 16), "criss_cross", 1)
    neighbors = grat_image_pairs(512, 512, (16, 16), "neighbors", 1)
    assert round(100 * image_query_sparsity(512, 512, 512, criss_cross), 3) == 93.665
    assert round(100 * image_query_sparsity(512, 512, 512, neighbors), 2) == 98.96


@pytest.mark.parametrize("pattern, reach", [("criss_cross", 0), ("neighbors", 1), ("neighbors", 2)])
def test_grat_closed_form_counts_match_the_mask(pattern, reach):
    grid = TokenGrid(30, 52, text_tokens=20)
    image = slice(grid.image_range.start, grid.image_range.stop)
    mask = grat_mask(grid, (8, 16), pattern, reach)
    assert int(mask[image, image].sum()) == grat_image_pairs(30, 52, (8, 16), pattern, reach)


@pytest.mark.parametrize("pattern", ["neighbors", "criss_cross"])
def test_grat_gradcheck(pattern):
    grid = TokenGrid(3, 5, frames=2, text_tokens=2)
    q, k, v = random_qkv(2, 1, grid.num_tokens, 4, dtype=torch.float64, seed=3, requires_grad=True)
    text_mask = torch.tensor([[True, False], [True, True]])

    def fn(q, k, v):
        return grat_attention(q, k, v, grid, group=(1, 2, 2), pattern=pattern, reach=0, text_mask=text_mask)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_argument_errors_name_the_argument():
    grid = TokenGrid(4, 4, text_tokens=2)
    q, k, v = random_qkv(1, 1, grid.num_tokens, 8)
    with pytest.raises(ValueError, match="pattern"):
        grat_attention(q, k, v, grid, pattern="stripes")
    with pytest.raises(ValueError, match="reach"):
        grat_attention(q, k, v, grid, reach=-1)
    with pytest.raises(ValueError, match="text_mask"):
        grat_attention(q, k, v, grid, text_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_mask"):
        grat_attention(q, k, v, grid, text_mask=torch.ones(2, 2, dtype=torch.bool))
