"""TokenGrid and the token orders: Rust (difattn.ops._base.orders) against the plain-torch reference, exactly."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difattn import TokenGrid
from difattn.ops._base import orders as plans
from difattn.reference import ordering
from difattn.testing.strategies import token_grids

tiles = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))


def test_grid_counts_ranges_and_coords():
    grid = TokenGrid(3, 5, frames=2, text_tokens=4, text_position="first")
    assert grid.num_tokens == 34 and grid.image_tokens == 30
    assert grid.text_range == range(0, 4) and grid.image_range == range(4, 34)
    coords = grid.coords()
    assert coords[:4].eq(-1).all()
    assert coords[4].tolist() == [0, 0, 0] and coords[4 + 5].tolist() == [0, 1, 0]
    assert coords[4 + 15].tolist() == [1, 0, 0] and coords[-1].tolist() == [1, 2, 4]
    assert grid.is_text().tolist() == [True] * 4 + [False] * 30
    last = TokenGrid(3, 5, text_tokens=2, text_position="last")
    assert last.text_range == range(15, 17) and last.image_range == range(0, 15)
    assert last.is_text()[15:].all() and not last.is_text()[:15].any()


def test_grid_is_hashable_and_frozen():
    a, b = TokenGrid(4, 4, text_tokens=1), TokenGrid(4, 4, text_tokens=1)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(Exception):
        a.height = 5


@given(grid=token_grids(), tile=tiles)
def test_tile_order_matches_reference(grid, tile):
    perm, inv = plans.tile_order(grid, tile)
    assert torch.equal(perm, ordering.tile_permutation(grid, tile))
    assert torch.equal(inv, ordering.inverse_permutation(perm))
    block = tile[1] * tile[2]
    if tile[0] == 1:  # PISA's layout: tiles of one frame, one block each, text in runs of the block size
        blocks_perm, offsets = plans.token_blocks(grid, tile, block, "cpu")
        assert torch.equal(blocks_perm, perm)
        assert torch.equal(offsets.diff(), ordering.pisa_block_sizes(grid, grid.num_tokens, block, tile[1:]))


@given(grid=token_grids(), group=tiles)
def test_group_order_matches_reference(grid, group):
    perm, inv = plans.group_order(grid, group)
    assert torch.equal(perm, ordering.tile_permutation(grid, group))
    assert torch.equal(perm[inv], torch.arange(grid.num_tokens))


@given(grid=token_grids(max_side=40, max_tokens=2000))
def test_zorder_matches_reference(grid):
    perm, inv = plans.zorder(grid)
    assert torch.equal(perm, ordering.zorder_permutation(grid))
    assert torch.equal(inv[perm], torch.arange(grid.num_tokens))


@given(grid=token_grids(), tile=tiles)
def test_orders_round_trip_and_keep_text_in_place(grid, tile):
    x = torch.randn(grid.num_tokens, 3)
    text = torch.tensor(list(grid.text_range), dtype=torch.int64)
    for perm, inv in (plans.tile_order(grid, tile), plans.zorder(grid)):
        assert torch.equal(x[perm][inv], x)
        assert torch.equal(perm[text], text)
        image = perm[grid.image_range.start : grid.image_range.stop]
        assert torch.equal(image.sort().values, torch.arange(grid.image_range.start, grid.image_range.stop))


def test_tile_order_keeps_tiles_contiguous_in_raster_order():
    grid = TokenGrid(5, 7, text_tokens=3, text_position="last")
    perm, _ = plans.tile_order(grid, (1, 2, 3))
    coords = grid.coords()[perm[:35]]
    # First tile: rows 0-1, cols 0-2; second tile: rows 0-1, cols 3-5; third (ragged): rows 0-1, col 6.
    assert coords[:6, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert coords[6:12, 1:].tolist() == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4], [1, 5]]
    assert coords[12:14, 1:].tolist() == [[0, 6], [1, 6]]


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_zorder_power_of_two_blocks_are_squares(side):
    grid = TokenGrid(side, side, frames=2, text_tokens=5)
    perm, _ = plans.zorder(grid)
    coords = grid.coords()[perm[5:]]
    for block in coords.split(16):
        assert block[:, 0].unique().numel() == 1  # never crosses frames
        ys, xs = block[:, 1], block[:, 2]
        assert ys.max() - ys.min() == 3 and xs.max() - xs.min() == 3 and ys.min() % 4 == 0 and xs.min() % 4 == 0


def test_zorder_skips_codes_outside_non_power_of_two_grid():
    grid = TokenGrid(3, 5)
    perm, _ = plans.zorder(grid)
    coords = grid.coords()[perm][:, 1:].tolist()
    assert coords[:8] == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert coords[8:] == [[2, 0], [2, 1], [2, 2], [2, 3], [0, 4], [1, 4], [2, 4]]


def test_plan_cache_never_returns_a_stale_plan():
    small, large = TokenGrid(8, 8), TokenGrid(16, 16)
    for _ in range(3):  # resolution back and forth
        for grid in (small, large):
            perm, _ = plans.zorder(grid)
            assert perm.numel() == grid.num_tokens
            assert torch.equal(perm, ordering.zorder_permutation(grid))
    a, _ = plans.tile_order(small, (1, 2, 2))
    b, _ = plans.tile_order(small, (1, 4, 4))
    assert not torch.equal(a, b)


def test_core_rejects_bad_arguments():
    from difattn._native import core

    with pytest.raises(ValueError, match="tile height"):
        core().tile_order((1, 4, 4, 0, "first"), (1, 0, 2))
    with pytest.raises(ValueError, match="text_position"):
        core().zorder((1, 4, 4, 0, "middle"))
    with pytest.raises(ValueError, match="height"):
        core().zorder((1, 0, 4, 0, "first"))
