"""CLEAR: on CPU the disc kernels (exact key ranges per tile of eight queries); on the GPU the block engine over a
tiled plan of discs (full blocks inside, masked blocks on the rim)."""

from __future__ import annotations

import torch

from .._options import clear_radii
from ..grid import TokenGrid
from .block_attention import block_attention
from .block_plan import kernel_blocks, traced_clear_plan
from .clear_disc import clear_disc_attention


def clear_attention(q, k, v, grid: TokenGrid, *, radius, scale, global_kv=None, temporal_radius=None,
                    kernel: str) -> torch.Tensor:
    """Same contract as :func:`difattn.clear_attention` (arguments validated) on the ``kernel`` engine."""
    r, rt = clear_radii(grid, radius, temporal_radius)
    if kernel == "rust":
        return clear_disc_attention(q, k, v, grid, radius=r, temporal_radius=rt, scale=scale, global_kv=global_kv)
    num_global = 0 if global_kv is None else global_kv[0].shape[2]
    if global_kv is not None:
        k = torch.cat([k, global_kv[0]], dim=2)
        v = torch.cat([v, global_kv[1]], dim=2)
    blocks = kernel_blocks(kernel, max(q.shape[-1], v.shape[-1]))
    plan = traced_clear_plan(grid, r, rt, num_global, blocks, q.device)
    return block_attention(q, k, v, plan, scale=scale, kernel=kernel)
