"""GRAT on the block engine: group-major layouts where every image block pair is fully on or off."""

from __future__ import annotations

import torch

from .._options import grat_group
from ..grid import TokenGrid
from .block_attention import block_attention
from .block_plan import kernel_blocks, traced_grat_plan


def grat_attention(q, k, v, grid: TokenGrid, *, group=None, pattern="neighbors", reach=1, text_mask=None,
                   scale, kernel: str) -> torch.Tensor:
    """Same contract as :func:`difattn.grat_attention` (arguments validated) on the ``kernel`` engine."""
    masked = text_mask is not None and grid.text_tokens > 0
    blocks = kernel_blocks(kernel, max(q.shape[-1], v.shape[-1]))
    plan = traced_grat_plan(grid, grat_group(grid, group), pattern, reach, masked, blocks, q.device)
    key_valid = _key_valid(grid, text_mask, plan.field("k_perm")) if masked else None
    return block_attention(q, k, v, plan, scale=scale, kernel=kernel, key_valid=key_valid)


def _key_valid(grid: TokenGrid, text_mask: torch.Tensor, k_perm: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool in the key layout's order: text validity at text positions, True elsewhere."""
    valid = torch.ones(text_mask.shape[0], grid.num_tokens, dtype=torch.bool, device=text_mask.device)
    valid[:, grid.text_range.start : grid.text_range.stop] = text_mask
    return valid[:, k_perm]
