"""CLEAR in plain torch: softmax attention under the dense local-disc mask (Liu et al., "CLEAR: Conv-Like
Linearization Revs Pre-Trained Diffusion Transformers Up", arXiv 2412.16112)."""

from __future__ import annotations

import torch

from .._checks import resolve_scale
from .._options import clear_radii, clear_thresholds
from ..grid import TokenGrid, check_grid
from ._dense import masked_attention


def clear_mask(
    grid: TokenGrid,
    radius: float,
    temporal_radius: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(N, N)`` bool, True where query row may attend key column::

        allowed(q, k) = q is text or k is text or (dy² + dx² < r²  and  |dt| < rt)

    Windows are clipped at the border (edge queries keep a partial disc); ``temporal_radius`` defaults to
    ``grid.frames`` (every frame).
    """
    # Offsets are integers, so the strict float tests become exact integer bounds.
    max_sq_distance, max_frame_distance = clear_thresholds(*clear_radii(grid, radius, temporal_radius))
    t, y, x = grid.coords(device).unbind(1)
    dy = y[:, None] - y[None, :]
    dx = x[:, None] - x[None, :]
    in_disc = dy * dy + dx * dx <= max_sq_distance
    in_window = in_disc & ((t[:, None] - t[None, :]).abs() <= max_frame_distance)
    text = grid.is_text(device)
    return in_window | text[:, None] | text[None, :]


def clear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    *,
    radius: float,
    scale: float | None = None,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    temporal_radius: float | None = None,
) -> torch.Tensor:
    """Softmax attention under :func:`clear_mask`.

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``, N = ``grid.num_tokens``.
        global_kv: optional ``(k_g, v_g)``, ``(B, H, G, D)`` and ``(B, H, G, Dv)``: extra keys that every image
            query attends in the same softmax; text queries do not see them.

    Returns ``(B, H, N, Dv)`` in q's dtype.
    """
    check_grid(grid, q.shape[2])
    mask = clear_mask(grid, radius, temporal_radius, device=q.device)
    if global_kv is not None:
        k_global, v_global = global_kv
        k = torch.cat([k, k_global], dim=2)
        v = torch.cat([v, v_global], dim=2)
        image_rows = ~grid.is_text(q.device)
        mask = torch.cat([mask, image_rows[:, None].expand(-1, k_global.shape[2])], dim=1)
    return masked_attention(q, k, v, scale=resolve_scale(scale, q.shape[-1]), mask=mask)
