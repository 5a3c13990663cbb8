"""CLEAR's backend implementations (arguments validated and options resolved by :func:`difattn.clear_attention`)."""

from __future__ import annotations

import torch

from ..._native import core
from ...grid import TokenGrid
from ..block import block_attention, kernel_blocks
from ..block.plan import clear_plan_key
from .disc_op import clear_disc_fwd


def clear_on_discs(q, k, v, grid: TokenGrid, *, radius: float, temporal_radius: float, scale: float,
                   global_kv=None) -> torch.Tensor:
    """CLEAR with the CPU disc kernels. Returns ``(B, H, N, Dv)``."""
    k_g, v_g = (None, None) if global_kv is None else global_kv
    out, _ = clear_disc_fwd(q, k, v, k_g, v_g, *grid.core_args(), float(radius), float(temporal_radius),
                            float(scale))
    return out


def clear_on_blocks(q, k, v, grid: TokenGrid, *, radius: float, temporal_radius: float, scale: float,
                    global_kv=None, backend: str) -> torch.Tensor:
    """CLEAR on ``backend``'s block engine; the global tokens are extra keys after the sequence. Returns
    ``(B, H, N, Dv)``."""
    num_global = 0 if global_kv is None else global_kv[0].shape[2]
    if global_kv is not None:
        k = torch.cat([k, global_kv[0]], dim=2)
        v = torch.cat([v, global_kv[1]], dim=2)
    key = clear_plan_key(grid, radius, temporal_radius, num_global, kernel_blocks(backend, max(q.shape[-1], v.shape[-1])))
    return block_attention(q, k, v, key, scale=scale, backend=backend)


def computed_pairs_on_discs(grid: TokenGrid, radius: float, temporal_radius: float, global_tokens: int = 0) -> int:
    """(query, key) pairs the disc kernels compute (every lane of each tile over the union of its discs)."""
    return core().clear_computed_pairs(grid.core_args(), global_tokens, radius, temporal_radius)
