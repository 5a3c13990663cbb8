"""Token orders in plain torch: the readable twins of the Rust permutations in ``difattn._core``.

A permutation ``perm`` (int64, ``(N,)``) reads ``permuted = x[..., perm, :]``; its inverse restores
``x = permuted[..., inverse, :]``. Image tokens move; text tokens keep their positions.
"""

from __future__ import annotations

import torch

from ..grid import TokenGrid


def _sorted_image_order(grid: TokenGrid, key: torch.Tensor) -> torch.Tensor:
    """Full-sequence permutation that sorts the image tokens by ``key`` (one distinct int per image token)."""
    order = torch.argsort(key, stable=True)
    perm = torch.arange(grid.num_tokens, dtype=torch.int64)
    start = grid.image_range.start
    perm[start : start + grid.image_tokens] = order + start
    return perm


def tile_permutation(grid: TokenGrid, tile: tuple[int, int, int]) -> torch.Tensor:
    """Tiles of ``(tt, th, tw)`` image tokens in raster order, tokens inside a tile in raster order."""
    tt, th, tw = tile
    t, y, x = grid.image_coords().unbind(1)
    tiles_y = -(-grid.height // th)
    tiles_x = -(-grid.width // tw)
    tile_id = ((t // tt) * tiles_y + y // th) * tiles_x + x // tw
    raster = (t * grid.height + y) * grid.width + x
    return _sorted_image_order(grid, tile_id * grid.image_tokens + raster)


def tile_sizes(grid: TokenGrid, tile: tuple[int, int, int]) -> torch.Tensor:
    """Token count of each tile of :func:`tile_permutation`, in that order."""
    tt, th, tw = tile

    def spans(n: int, step: int) -> torch.Tensor:
        starts = torch.arange(0, n, step)
        return torch.clamp(starts + step, max=n) - starts

    ft, fy, fx = spans(grid.frames, tt), spans(grid.height, th), spans(grid.width, tw)
    return (ft[:, None, None] * fy[None, :, None] * fx[None, None, :]).reshape(-1)


def morton_code(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Interleave bits: x's at even positions, y's at odd positions."""
    code = torch.zeros_like(x)
    for bit in range(31):
        code |= ((x >> bit) & 1) << (2 * bit)
        code |= ((y >> bit) & 1) << (2 * bit + 1)
    return code


def zorder_permutation(grid: TokenGrid) -> torch.Tensor:
    """Per frame (frames outermost), image tokens sorted by the Morton code of ``(y, x)``."""
    t, y, x = grid.image_coords().unbind(1)
    by_code = torch.argsort(morton_code(y, x), stable=True)
    by_frame_then_code = by_code[torch.argsort(t[by_code], stable=True)]
    perm = torch.arange(grid.num_tokens, dtype=torch.int64)
    start = grid.image_range.start
    perm[start : start + grid.image_tokens] = by_frame_then_code + start
    return perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def pisa_block_sizes(grid: TokenGrid | None, num_tokens: int, block_size: int, tile: tuple[int, int]) -> torch.Tensor:
    """Token count of each PISA block, in block order, over the permuted sequence.

    Without a grid: runs of ``block_size`` (last may be short). With a grid: ``ceil(T / b)`` text blocks on the
    text side and one block per ``th x tw`` image tile per frame.
    """
    if grid is None:
        sizes = torch.full((-(-num_tokens // block_size),), block_size, dtype=torch.int64)
        sizes[-1] = num_tokens - block_size * (sizes.numel() - 1)
        return sizes
    text = pisa_block_sizes(None, grid.text_tokens, block_size, tile) if grid.text_tokens else torch.zeros(0, dtype=torch.int64)
    image = tile_sizes(grid, (1, tile[0], tile[1]))
    return torch.cat([text, image] if grid.text_position == "first" else [image, text])
