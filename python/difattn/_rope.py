"""Axial 2-D rotary position embedding on a token grid (the pixel DiT's positional encoding).

The head dim is split in half: the first half rotates with the token's row ``y``, the second with its column
``x``; inside each half, channel pairs ``(2i, 2i+1)`` rotate by ``pos * base**(-2i / half)``. Text tokens are
not rotated (cos 1, sin 0); video frames share the spatial rotation.
"""

from __future__ import annotations

import torch

from .grid import TokenGrid


def rope_2d(
    grid: TokenGrid,
    head_dim: int,
    *,
    base: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(N, head_dim)`` float32, for every token of ``grid`` in sequence order."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE (two axes of channel pairs), got {head_dim}")
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(0, half, 2, dtype=torch.float64, device=device) / half)  # (half/2,)
    coords = grid.coords(device).to(torch.float64)  # (N, 3) as (t, y, x); text rows are -1
    angles = torch.cat([coords[:, 1:2] * inv_freq, coords[:, 2:3] * inv_freq], dim=1)  # (N, half)
    angles[grid.is_text(device)] = 0.0
    angles = angles.repeat_interleave(2, dim=1)  # (N, head_dim): one angle per channel pair
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, D)`` by ``(cos, sin)`` ``(N, D)``; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    return (x.float() * cos + rotated * sin).to(x.dtype)
