"""The block layout of PISA, the reference's numbering: text runs of ``b`` tokens on the text
side, image tiles of ``th x tw`` per frame in raster order (:func:`difattn.reference.pisa.pisa_layout`), or runs of
``b`` tokens without a grid. Built from the compiled core's tile order, cached, and traceable by ``torch.compile``
(the core is reached through the opaque custom op ``difattn::pisa_grid_layout``; the sizes are plain arithmetic).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..._options import pisa_tile
from ...grid import TokenGrid
from .._base import orders


@dataclass(frozen=True)
class PisaLayout:
    """Blocks of PISA over a sequence: ``perm`` (``(N,)`` int64, block order → token), ``offsets`` (``(M+1,)``
    int64), ``counts`` (``(M,)`` int64), ``block_of`` (``(N,)`` int64, token → block). ``slots`` (``(M·b_max,)``
    int64: the token of each padded block slot, N for padding) is None when blocks are consecutive runs of
    ``b_max`` tokens (no grid)."""

    perm: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    block_of: torch.Tensor
    slots: torch.Tensor | None
    max_block: int

    @property
    def num_blocks(self) -> int:
        return self.counts.numel()


def layout_sizes(grid: TokenGrid | None, num_tokens: int, block_size: int) -> tuple[int, int]:
    """``(M, largest block)`` of the layout, from the shapes alone."""
    if grid is None:
        return -(-num_tokens // block_size), min(block_size, num_tokens)
    return _grid_sizes(grid.frames, grid.height, grid.width, grid.text_tokens, block_size)


def _grid_sizes(frames, height, width, text_tokens, block_size: int):
    """``(M, largest block)`` of a grid layout (plain arithmetic: the sizes may be symbolic under compile)."""
    th, tw = pisa_tile(block_size)
    tiles = frames * -(-height // th) * -(-width // tw)
    largest = max(min(th, height) * min(tw, width), min(block_size, text_tokens))
    return tiles + -(-text_tokens // block_size), largest


def _grid_from(grid: list[int]) -> TokenGrid:
    frames, height, width, text_tokens, text_last = grid
    return TokenGrid(height, width, frames=frames, text_tokens=text_tokens,
                     text_position="last" if text_last else "first")


@torch.library.custom_op("difattn::pisa_grid_layout", mutates_args=())
def pisa_grid_layout(grid: list[int], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm (N,), offsets (M+1,))`` int64 of a grid's layout: the compiled core's block layout (tiles of
    ``th x tw = block_size`` image tokens, text in runs of ``block_size``), cached. A custom op so that
    ``torch.compile`` sees an opaque call instead of the compiled core."""
    perm, offsets = orders.token_blocks(_grid_from(grid), (1, *pisa_tile(block_size)), block_size, str(device))
    return perm.clone(), offsets.clone()


@pisa_grid_layout.register_fake
def _(grid, block_size, device):
    frames, height, width, text_tokens, _ = grid
    num_blocks, _ = _grid_sizes(frames, height, width, text_tokens, block_size)
    return (torch.empty(text_tokens + frames * height * width, dtype=torch.int64, device=device),
            torch.empty(num_blocks + 1, dtype=torch.int64, device=device))


def pisa_layout(grid: TokenGrid | None, num_tokens: int, block_size: int, device: str) -> PisaLayout:
    """The reference's layout (:func:`difattn.reference.pisa.pisa_layout`): cached in eager mode, built in the
    graph under ``torch.compile`` (which would trace through a cache anyway, with a warning)."""
    if torch.compiler.is_compiling():
        return _build_layout(grid, num_tokens, block_size, device)
    return _cached_layout(grid, num_tokens, block_size, device)


@functools.lru_cache(maxsize=64)
def _cached_layout(grid: TokenGrid | None, num_tokens: int, block_size: int, device: str) -> PisaLayout:
    return _build_layout(grid, num_tokens, block_size, device)


def _build_layout(grid: TokenGrid | None, num_tokens: int, block_size: int, device: str) -> PisaLayout:
    num_blocks, max_block = layout_sizes(grid, num_tokens, block_size)
    if grid is None:
        perm = torch.arange(num_tokens, device=device)
        offsets = (torch.arange(num_blocks + 1, device=device) * block_size).clamp(max=num_tokens)
        return PisaLayout(perm, offsets, offsets.diff(), perm // block_size, None, max_block)
    text_last = int(grid.text_position == "last")
    args = [grid.frames, grid.height, grid.width, grid.text_tokens, text_last]
    perm, offsets = pisa_grid_layout(args, block_size, torch.device(device))
    counts = offsets.diff()
    slot = torch.arange(max_block, device=device)
    token = perm[(offsets[:-1, None] + slot).clamp(max=num_tokens - 1)]
    slots = torch.where(slot < counts[:, None], token, num_tokens).flatten()
    block_at = torch.repeat_interleave(torch.arange(num_blocks, device=device), counts, output_size=num_tokens)
    block_of = torch.empty_like(perm).scatter_(0, perm, block_at)
    return PisaLayout(perm, offsets, counts, block_of, slots, max_block)
