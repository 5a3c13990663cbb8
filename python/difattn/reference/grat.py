"""GRAT in plain torch: softmax attention under the dense group mask (Ren et al., "Grouping First, Attending
Smartly: Training-Free Acceleration for Diffusion Transformers", arXiv 2505.14687)."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_int, resolve_scale
from .._options import GRAT_PATTERNS, grat_group, grat_text_mask
from ..grid import TokenGrid, check_grid
from ._dense import masked_attention


def grat_mask(
    grid: TokenGrid,
    group: tuple[int, int] | tuple[int, int, int] | None,
    pattern: str,
    reach: int,
    text_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """GRAT's mask, True where query row may attend key column.

    Image token ``(t, y, x)`` lies in group ``(a, p, q) = (t // gt, y // gh, x // gw)`` (border groups are
    smaller when a side is not a multiple of the group). Between image tokens::

        neighbors:    |Δa| <= reach and |Δp| <= reach and |Δq| <= reach
        criss_cross:  Δp == 0 or Δq == 0                 when grid.frames == 1
                      Δa == 0 or Δp == 0 or Δq == 0      when grid.frames > 1

    (on a single frame every token has ``a = 0``, so the three-plane rule would be dense). Text queries see
    every valid key; text keys are seen by every query when valid.

    Args:
        group: ``(gh, gw)``, ``(gt, gh, gw)`` or None (16x16 on images, 4x8x8 on videos).
        text_mask: optional ``(B, T)`` bool, True at real (non-padding) text tokens.

    Returns ``(N, N)`` bool, or ``(B, 1, N, N)`` with ``text_mask``.
    """
    gt, gh, gw = grat_group(grid, group)
    check_choice("pattern", pattern, GRAT_PATTERNS)
    reach = check_int("reach", reach, minimum=0)
    t, y, x = grid.coords(device).unbind(1)
    da, dp, dq = ((c[:, None] - c[None, :]).abs() for c in (t // gt, y // gh, x // gw))
    if pattern == "neighbors":
        image_pairs = (da <= reach) & (dp <= reach) & (dq <= reach)
    elif grid.frames == 1:
        image_pairs = (dp == 0) | (dq == 0)
    else:
        image_pairs = (da == 0) | (dp == 0) | (dq == 0)
    text = grid.is_text(device)
    mask = image_pairs | text[:, None] | text[None, :]
    if text_mask is None:
        return mask
    valid_keys = _valid_keys(grid, text_mask, device)
    return (mask & valid_keys[:, None, :])[:, None]


def _valid_keys(grid: TokenGrid, text_mask: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``(B, N)`` bool: image keys always valid, text keys where ``text_mask`` says so."""
    if not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool:
        raise TypeError(f"text_mask must be a bool tensor, got {getattr(text_mask, 'dtype', type(text_mask))}")
    if text_mask.dim() != 2 or text_mask.shape[1] != grid.text_tokens:
        raise ValueError(
            f"text_mask must have shape (B, T) with T = {grid.text_tokens} text tokens, got {tuple(text_mask.shape)}"
        )
    valid = torch.ones(text_mask.shape[0], grid.num_tokens, dtype=torch.bool, device=device)
    valid[:, grid.text_range.start : grid.text_range.stop] = text_mask.to(device)
    return valid


def grat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    *,
    group: tuple[int, int] | tuple[int, int, int] | None = None,
    pattern: str = "neighbors",
    reach: int = 1,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention under :func:`grat_mask`.

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``, N = ``grid.num_tokens``.
        text_mask: optional ``(B, T)`` bool of valid text tokens, or ``(B,)`` integer counts of them (sample b's
            first ``n_b`` text tokens); padded text keys are excluded for every query.

    Returns ``(B, H, N, Dv)`` in q's dtype.
    """
    check_grid(grid, q.shape[2])
    if text_mask is not None and text_mask.dtype != torch.bool:
        text_mask = grat_text_mask(text_mask, q.shape[0], grid, q.device)
    mask = grat_mask(grid, group, pattern, reach, text_mask, device=q.device)
    if text_mask is not None and text_mask.shape[0] != q.shape[0]:
        raise ValueError(f"text_mask must have q's batch size {q.shape[0]}, got shape {tuple(text_mask.shape)}")
    return masked_attention(q, k, v, scale=resolve_scale(scale, q.shape[-1]), mask=mask)
