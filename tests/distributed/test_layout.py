"""The layouts: every token on exactly one rank, local order = the grid's order, tensor_split's balance, and
diffusers' contiguous runs recognised as row stripes exactly when they are."""

from __future__ import annotations

import pytest
import torch

from difattn import TokenGrid
from difattn.distributed._layout import Layout, balanced


@pytest.mark.parametrize("total,parts", [(7, 3), (3, 4), (12, 4), (0, 2)])
def test_balanced_splits_like_tensor_split(total, parts):
    sizes = [b - a for a, b in balanced(total, parts)]
    assert sizes == [len(chunk) for chunk in torch.arange(total).tensor_split(parts)]


@pytest.mark.parametrize("grid", [TokenGrid(7, 6, text_tokens=5), TokenGrid(5, 4, frames=2, text_tokens=3,
                                                                             text_position="last"), TokenGrid(9, 5)])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_stripes_partition_the_sequence_in_grid_order(grid, world):
    layout = Layout.stripes(grid, world)
    together = torch.cat([layout.indices(r) for r in range(world)])
    assert torch.equal(together.sort().values, torch.arange(grid.num_tokens))
    assert torch.equal(together[layout.to_full()], torch.arange(grid.num_tokens))
    for r in range(world):
        local = layout.local_grid(r)
        index = layout.indices(r)
        assert local.num_tokens == layout.count(r) == index.numel()
        # the shard is the local grid's sequence: text where its grid puts text, image rows in raster order
        assert torch.equal(grid.is_text()[index], local.is_text())
        coords = grid.coords()[index][local.image_range.start : local.image_range.stop]
        assert torch.equal(coords - torch.tensor([0, layout.rows[r][0], 0]), local.image_coords())


def test_diffusers_runs_are_stripes_only_when_whole_rows_of_one_frame():
    assert Layout.chunks(TokenGrid(6, 4, text_tokens=6), 2).rows == ((0, 3), (3, 6))
    assert Layout.chunks(TokenGrid(5, 4), 2).rows is None  # 10 tokens per rank: half a row
    video = Layout.chunks(TokenGrid(4, 4, frames=2), 2)
    assert video.rows is None and video.image == ((0, 16), (16, 32))
    assert torch.equal(video.indices(1), torch.arange(16, 32))
