"""The CLEAR reference against brute force written literally from the paper's mask rule, plus exactness
properties, the check values of the paper's settings and finite-difference gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from brute_force import assert_float64_equal, brute_attention, brute_clear_mask
from difattn.grid import TokenGrid
from difattn.reference.clear import clear_attention, clear_mask
from difattn.testing import random_qkv
from difattn.testing.strategies import disc_radii, head_dims, token_grids
from hypothesis import given, settings
from hypothesis import strategies as st

MASK_SETTINGS = settings(max_examples=250, deadline=None)
ATTENTION_SETTINGS = settings(max_examples=25, deadline=None)

small_grids = token_grids(max_side=9, max_frames=3, max_text=8, max_tokens=120)
radii = disc_radii(7.0)
temporal_radii = st.one_of(st.none(), st.integers(1, 3).map(float), st.floats(0.3, 3.5))


def sdpa64(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def clear_allowed_pairs(height: int, width: int, text: int, radius: float) -> int:
    """Allowed pairs on one frame: text rows and columns, plus ``(height-|dy|)(width-|dx|)`` per disc offset."""
    reach = math.ceil(radius)
    offsets = torch.arange(-reach, reach + 1)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    in_disc = dy * dy + dx * dx < radius * radius
    image_pairs = ((height - dy.abs()).clamp(min=0) * (width - dx.abs()).clamp(min=0))[in_disc].sum()
    image = height * width
    return text * (text + image) + image * text + int(image_pairs)


def flux_gflops(pairs: int) -> float:
    return round(4 * pairs * 24 * 128 / 1e9, 1)


@MASK_SETTINGS
@given(grid=small_grids, r=radii, rt=temporal_radii)
def test_clear_mask_is_the_spec_rule(grid, r, rt):
    assert torch.equal(clear_mask(grid, r, rt), brute_clear_mask(grid, r, rt))


@pytest.mark.parametrize("r, kept_sq_distances", [(2.0, {0, 1, 2}), (1.0, {0}), (math.sqrt(5) + 1e-9, {0, 1, 2, 4, 5})])
def test_clear_radius_is_strict(r, kept_sq_distances):
    grid = TokenGrid(9, 9)
    centre = 4 * 9 + 4
    row = clear_mask(grid, r)[centre].reshape(9, 9)
    y, x = torch.meshgrid(torch.arange(9) - 4, torch.arange(9) - 4, indexing="ij")
    assert set((y * y + x * x)[row].tolist()) == kept_sq_distances


@ATTENTION_SETTINGS
@given(grid=small_grids, r=radii, rt=temporal_radii, d=head_dims(), use_global=st.booleans(), seed=st.integers(0, 99))
def test_clear_attention_matches_brute_force(grid, r, rt, d, use_global, seed):
    q, k, v = random_qkv(2, 2, grid.num_tokens, d, Dv=8, dtype=torch.float64, seed=seed)
    global_kv = None
    if use_global:
        k_g, _, v_g = random_qkv(2, 2, 3, d, Dv=8, dtype=torch.float64, seed=seed + 1)
        global_kv = (k_g, v_g)
    out = clear_attention(q, k, v, grid, radius=r, temporal_radius=rt, global_kv=global_kv, scale=0.3)
    allowed = brute_clear_mask(grid, r, rt).expand(2, -1, -1)
    assert_float64_equal(out, brute_attention(q, k, v, allowed, 0.3, global_kv, grid))


@ATTENTION_SETTINGS
@given(grid=small_grids, margin=st.floats(0.01, 5.0))
def test_clear_covering_radius_is_dense(grid, margin):
    radius = math.hypot(grid.height, grid.width) + margin
    assert clear_mask(grid, radius).all()
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.float64)
    assert_float64_equal(clear_attention(q, k, v, grid, radius=radius), sdpa64(q, k, v))


def test_clear_flux_1024_check_values():
    n = 512 + 64 * 64
    assert flux_gflops(n * n) == 260.9
    expected = {8: 63.5, 16: 86.6, 32: 154.1}
    assert {r: flux_gflops(clear_allowed_pairs(64, 64, 512, r)) for r in expected} == expected
    grid = TokenGrid(64, 64, text_tokens=512)
    assert int(clear_mask(grid, 8.0).sum()) == clear_allowed_pairs(64, 64, 512, 8.0)


def test_clear_8k_density():
    n = 512 + 512 * 512
    assert round(100 * clear_allowed_pairs(512, 512, 512, 8.0) / n**2, 3) == 0.462


def test_clear_gradcheck():
    grid = TokenGrid(3, 4, frames=2, text_tokens=2, text_position="last")
    q, k, v = random_qkv(1, 2, grid.num_tokens, 4, Dv=3, dtype=torch.float64, seed=1, requires_grad=True)
    k_g, _, v_g = random_qkv(1, 2, 2, 4, Dv=3, dtype=torch.float64, seed=2, requires_grad=True)

    def fn(q, k, v, k_g, v_g):
        return clear_attention(q, k, v, grid, radius=1.5, temporal_radius=1.0, global_kv=(k_g, v_g))

    assert torch.autograd.gradcheck(fn, (q, k, v, k_g, v_g))


def test_argument_errors_name_the_argument():
    grid = TokenGrid(4, 4, text_tokens=2)
    q, k, v = random_qkv(1, 1, grid.num_tokens, 8)
    with pytest.raises(ValueError, match="radius"):
        clear_attention(q, k, v, grid, radius=0.0)
    with pytest.raises(ValueError, match="grid"):
        clear_attention(q, k, v, TokenGrid(4, 5), radius=2.0)
