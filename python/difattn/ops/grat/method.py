"""GRAT's backend implementation on the block engine (arguments validated and options resolved by
:func:`difattn.grat_attention`)."""

from __future__ import annotations

import torch

from ...grid import TokenGrid
from ..block import block_attention, kernel_blocks
from ..block.plan import grat_plan_key


def grat_on_blocks(q, k, v, grid: TokenGrid, *, group: tuple[int, int, int], pattern: str, reach: int,
                   text_mask: torch.Tensor | None, scale: float, backend: str) -> torch.Tensor:
    """GRAT on ``backend``'s block engine; ``text_mask`` ``(B, T)`` marks the real text tokens. Returns
    ``(B, H, N, Dv)``."""
    masked = text_mask is not None and grid.text_tokens > 0
    key = grat_plan_key(grid, group, pattern, reach, masked, kernel_blocks(backend, max(q.shape[-1], v.shape[-1])))
    key_valid = _key_valid(grid, text_mask) if masked else None
    return block_attention(q, k, v, key, scale=scale, backend=backend, key_valid=key_valid)


def _key_valid(grid: TokenGrid, text_mask: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool in sequence order: the text mask at text positions, True elsewhere."""
    valid = torch.ones(text_mask.shape[0], grid.num_tokens, dtype=torch.bool, device=text_mask.device)
    valid[:, grid.text_range.start : grid.text_range.stop] = text_mask
    return valid
