"""Token orders built by the compiled core, cached per (grid, tile, device): tile order (PISA blocks, block
plans), group-major order (GRAT) and per-frame Z-order (LLSA), each with its inverse.

A permutation ``perm`` reads ``x[..., perm, :]``; image tokens move, text tokens keep their positions. Caches are
bounded LRU caches keyed by every input, so switching resolutions never returns a stale order.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..._native import core
from ...grid import TokenGrid

_CACHE_SIZE = 64


def _int64(raw: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw, dtype="<i8").copy())


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _order_on(kind: str, grid: TokenGrid, tile: tuple[int, int, int] | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = grid.core_args()
    if kind == "tile":
        perm, inv = core().tile_order(args, tile)
    elif kind == "group":
        perm, inv = core().group_order(args, tile)
    else:
        perm, inv = core().zorder(args)
    return _int64(perm).to(device), _int64(inv).to(device)


def _device_key(device: torch.device | str | None) -> str:
    return str(torch.device(device if device is not None else "cpu"))


def tile_order(grid: TokenGrid, tile: tuple[int, int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` int64 ``(N,)``: image tokens in tiles of ``(tt, th, tw)``, text in place."""
    return _order_on("tile", grid, tuple(tile), _device_key(device))


def group_order(grid: TokenGrid, group: tuple[int, int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` int64 ``(N,)``: GRAT's group-major order."""
    return _order_on("group", grid, tuple(group), _device_key(device))


def zorder(grid: TokenGrid, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` int64 ``(N,)``: LLSA's per-frame Z-order."""
    return _order_on("zorder", grid, None, _device_key(device))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def token_blocks(grid: TokenGrid, tile: tuple[int, int, int], block: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm (N,), offsets (M + 1,))`` int64: image tokens in tiles of ``tile`` and text in runs of ``block``, each
    cut into blocks of at most ``block`` tokens (text first or last as in the sequence)."""
    perm, offsets = core().token_blocks(grid.core_args(), tuple(tile), block, block)
    return _int64(perm).to(device), _int64(offsets).to(device)


def clear_cache() -> None:
    """Drop every cached order."""
    _order_on.cache_clear()
    token_blocks.cache_clear()
