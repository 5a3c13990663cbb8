"""The CLEAR and GRAT references against brute force written literally from the specs, plus exactness
properties, the specs' check values and finite-difference gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from difattn.grid import TokenGrid
from difattn.reference.clear import clear_attention, clear_mask
from difattn.reference.grat import grat_attention, grat_mask
from difattn.testing import random_qkv
from difattn.testing.strategies import head_dims, token_grids

MASK_SETTINGS = settings(max_examples=250, deadline=None)
ATTENTION_SETTINGS = settings(max_examples=25, deadline=None)

small_grids = token_grids(max_side=9, max_frames=3, max_text=8, max_tokens=120)
radii = st.one_of(
    st.integers(1, 6).map(float),  # integer radii: the strict test drops the offsets at distance exactly r
    st.sampled_from([math.sqrt(2), math.sqrt(5), 2.5]),
    st.floats(0.3, 7.0),
)
temporal_radii = st.one_of(st.none(), st.integers(1, 3).map(float), st.floats(0.3, 3.5))
groups = st.one_of(
    st.none(),
    st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
)
patterns = st.sampled_from(["neighbors", "criss_cross"])


# ---------------------------------------------------------------- brute force, one (query, key) pair at a time


def token_coords(grid: TokenGrid) -> list[tuple[int, int, int] | None]:
    """``(t, y, x)`` of every token from the layout rules (None for text), independent of ``TokenGrid.coords``."""
    first_image = grid.text_tokens if grid.text_position == "first" else 0
    plane = grid.height * grid.width
    coords = []
    for i in range(grid.num_tokens):
        j = i - first_image
        is_image = 0 <= j < grid.image_tokens
        coords.append((j // plane, j // grid.width % grid.height, j % grid.width) if is_image else None)
    return coords


def brute_clear_mask(grid: TokenGrid, r: float, rt: float | None) -> torch.Tensor:
    rt = grid.frames if rt is None else rt
    coords = token_coords(grid)

    def allowed(cq, ck) -> bool:
        if cq is None or ck is None:
            return True
        (tq, yq, xq), (tk, yk, xk) = cq, ck
        return (yq - yk) ** 2 + (xq - xk) ** 2 < r * r and abs(tq - tk) < rt

    return torch.tensor([[allowed(cq, ck) for ck in coords] for cq in coords])


def brute_grat_mask(grid, group, pattern, reach, text_mask=None) -> torch.Tensor:
    """``(B, N, N)`` (B = 1 without ``text_mask``)."""
    if group is None:
        group = (1, 16, 16) if grid.frames == 1 else (4, 8, 8)
    gt, gh, gw = (1, *group) if len(group) == 2 else group
    coords = token_coords(grid)
    first_text = grid.text_range.start
    valid = [[True] * grid.text_tokens] if text_mask is None else text_mask.tolist()

    def image_allowed(cq, ck) -> bool:
        da, dp, dq = abs(cq[0] // gt - ck[0] // gt), abs(cq[1] // gh - ck[1] // gh), abs(cq[2] // gw - ck[2] // gw)
        if pattern == "neighbors":
            return da <= reach and dp <= reach and dq <= reach
        if grid.frames == 1:
            return dp == 0 or dq == 0
        return da == 0 or dp == 0 or dq == 0

    def allowed(b, cq, j) -> bool:
        ck = coords[j]
        if ck is None:
            return valid[b][j - first_text]
        return cq is None or image_allowed(cq, ck)

    keys = range(grid.num_tokens)
    return torch.tensor([[[allowed(b, cq, j) for j in keys] for cq in coords] for b in range(len(valid))])


def brute_attention(q, k, v, allowed, scale, global_kv=None, grid=None) -> torch.Tensor:
    """Per query: softmax over exactly its allowed keys (``allowed`` is ``(B, N, N)``), plus the global keys for
    image queries."""
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    coords = token_coords(grid) if global_kv is not None else None
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            keys = allowed[b, i].nonzero().squeeze(1)
            k_i, v_i = k[b][:, keys], v[b][:, keys]  # (H, n, D), (H, n, Dv)
            if global_kv is not None and coords[i] is not None:
                k_i = torch.cat([k_i, global_kv[0][b]], dim=1)
                v_i = torch.cat([v_i, global_kv[1][b]], dim=1)
            weights = torch.softmax(scale * torch.einsum("hd,hnd->hn", q[b, :, i], k_i), dim=-1)
            out[b, :, i] = torch.einsum("hn,hnd->hd", weights, v_i)
    return out


def assert_float64_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- masks


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


# ---------------------------------------------------------------- attention against brute force


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
@given(grid=small_grids, group=groups, pattern=patterns, reach=st.integers(0, 2), seed=st.integers(0, 99))
def test_grat_attention_matches_brute_force(grid, group, pattern, reach, seed):
    q, k, v = random_qkv(2, 2, grid.num_tokens, 16, dtype=torch.float64, seed=seed)
    text_mask = torch.rand(2, grid.text_tokens, generator=torch.Generator().manual_seed(seed)) < 0.6
    out = grat_attention(q, k, v, grid, group=group, pattern=pattern, reach=reach, text_mask=text_mask)
    allowed = brute_grat_mask(grid, group, pattern, reach, text_mask)
    assert_float64_equal(out, brute_attention(q, k, v, allowed, 16**-0.5))


# ---------------------------------------------------------------- exactness: masks that cover everything


def sdpa64(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@ATTENTION_SETTINGS
@given(grid=small_grids, margin=st.floats(0.01, 5.0))
def test_clear_covering_radius_is_dense(grid, margin):
    radius = math.hypot(grid.height, grid.width) + margin
    assert clear_mask(grid, radius).all()
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, dtype=torch.float64)
    assert_float64_equal(clear_attention(q, k, v, grid, radius=radius), sdpa64(q, k, v))


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


# ---------------------------------------------------------------- check values of the specs


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


# ---------------------------------------------------------------- gradients and argument errors


def test_clear_gradcheck():
    grid = TokenGrid(3, 4, frames=2, text_tokens=2, text_position="last")
    q, k, v = random_qkv(1, 2, grid.num_tokens, 4, Dv=3, dtype=torch.float64, seed=1, requires_grad=True)
    k_g, _, v_g = random_qkv(1, 2, 2, 4, Dv=3, dtype=torch.float64, seed=2, requires_grad=True)

    def fn(q, k, v, k_g, v_g):
        return clear_attention(q, k, v, grid, radius=1.5, temporal_radius=1.0, global_kv=(k_g, v_g))

    assert torch.autograd.gradcheck(fn, (q, k, v, k_g, v_g))


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
    with pytest.raises(ValueError, match="radius"):
        clear_attention(q, k, v, grid, radius=0.0)
    with pytest.raises(ValueError, match="pattern"):
        grat_attention(q, k, v, grid, pattern="stripes")
    with pytest.raises(ValueError, match="reach"):
        grat_attention(q, k, v, grid, reach=-1)
    with pytest.raises(ValueError, match="text_mask"):
        grat_attention(q, k, v, grid, text_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_mask"):
        grat_attention(q, k, v, grid, text_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid"):
        clear_attention(q, k, v, TokenGrid(4, 5), radius=2.0)
