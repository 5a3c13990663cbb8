"""Work models: the FLOPs each method must do (needed) and does (computed), as fractions of dense attention.

Dense attention costs ``4·B·H·N²·D`` forward (two GEMMs) and 2.5x that backward; a method that attends a
fraction ``f`` of the (query, key) pairs needs ``f`` of it, forward and backward. Pair counts are exact and
closed-form (no N² mask). Linear attention's backward is 2x its forward (four GEMMs against two), so its
forward+backward fraction is scaled by ``(1 + 2) / (1 + 2.5)`` (:func:`pass_factor`).
"""

from __future__ import annotations

import math

import torch

from .._options import clear_radii, clear_thresholds, grat_group, llsa_config, llsa_level_sizes, pisa_num_selected
from ..grid import TokenGrid


def clear_pairs(grid: TokenGrid, radius: float, temporal_radius: float | None = None) -> int:
    """Allowed (query, key) pairs of CLEAR's mask: text rows and columns plus clipped discs."""
    max_d2, max_dt = clear_thresholds(*clear_radii(grid, radius, temporal_radius))
    reach = math.isqrt(max_d2)
    dy = torch.arange(-reach, reach + 1)
    half = torch.tensor([math.isqrt(max_d2 - int(d) ** 2) for d in dy])  # |dx| <= half[dy]
    y = torch.arange(grid.height)[:, None]
    rows_ok = ((y + dy[None, :]) >= 0) & ((y + dy[None, :]) < grid.height)  # (H, 2R+1)
    x = torch.arange(grid.width)[:, None]
    lo = (x - half[None, :]).clamp(min=0)
    hi = (x + half[None, :]).clamp(max=grid.width - 1)
    cols = (hi - lo + 1).clamp(min=0)  # (W, 2R+1): keys per (query column, dy)
    spatial = int((rows_ok.long().sum(0) * cols.sum(0)).sum())  # summed over query rows, columns and dy
    frame_pairs = sum(min(grid.frames, t + max_dt + 1) - max(0, t - max_dt) for t in range(grid.frames))
    image = spatial * frame_pairs
    text, n = grid.text_tokens, grid.num_tokens
    return image + text * n + grid.image_tokens * text


def grat_pairs(grid: TokenGrid, group, pattern: str, reach: int) -> int:
    """Allowed pairs of GRAT's mask (every text key valid), counted group by group."""
    gt, gh, gw = grat_group(grid, group)

    def sizes(n: int, g: int) -> torch.Tensor:
        starts = torch.arange(0, n, g)
        return (starts + g).clamp(max=n) - starts

    st, sy, sx = sizes(grid.frames, gt), sizes(grid.height, gh), sizes(grid.width, gw)
    ids = [torch.arange(s.numel()) for s in (st, sy, sx)]
    da, dp, dq = (i[:, None] - i[None, :] for i in ids)
    if pattern == "neighbors":
        near = [d.abs() <= reach for d in (da, dp, dq)]
        # Allowed groups factorise per axis: count pairs per axis and multiply.
        per_axis = [int((s[:, None] * s[None, :] * m).sum()) for s, m in zip((st, sy, sx), near)]
        image = per_axis[0] * per_axis[1] * per_axis[2]
    else:
        tot = [int(s.sum()) ** 2 for s in (st, sy, sx)]
        same = [int((s * s).sum()) for s in (st, sy, sx)]  # pairs in the same band along an axis
        if grid.frames > 1:  # Δa == 0 or Δp == 0 or Δq == 0, by inclusion–exclusion
            a, p, q = same
            ta, tp, tq = tot
            image = a * tp * tq + ta * p * tq + ta * tp * q - a * p * tq - a * tp * q - ta * p * q + a * p * q
        else:  # Δp == 0 or Δq == 0
            _, p, q = same
            _, tp, tq = tot
            image = p * tq + tp * q - p * q
    text, n = grid.text_tokens, grid.num_tokens
    return image + text * n + grid.image_tokens * text


def pisa_fraction(num_tokens: int, density: float, block_size: int) -> float:
    """Exact blocks plus one centroid per unselected block, per query."""
    num_blocks = -(-num_tokens // block_size)
    k = pisa_num_selected(density, num_blocks)
    return min(1.0, (k * block_size + (num_blocks - k)) / num_tokens)


def llsa_fraction(num_tokens: int, block_size: int, topk, levels) -> float:
    """Keys per query: selected fine tokens, intermediate candidates and every coarsest token."""
    levels, ks = llsa_config(num_tokens, block_size, topk, levels)
    keys = ks[0] * block_size + sum(ks[l] * block_size for l in range(1, levels))
    keys += llsa_level_sizes(num_tokens, block_size, levels)[levels]
    return min(1.0, keys / num_tokens)


DENSE_BACKWARD_RATIO = 2.5
LINEAR_BACKWARD_RATIO = 2.0


def pass_factor(method: str, backward: bool) -> float:
    """Factor on a method's forward fraction for the forward+backward pass (1 where its backward scales like
    dense attention's)."""
    if not backward or method not in ("linear", "dydila"):
        return 1.0
    return (1 + LINEAR_BACKWARD_RATIO) / (1 + DENSE_BACKWARD_RATIO)


def linear_fraction(num_tokens: int, head_dim_v: int) -> float:
    """``S = kᵀv`` and ``O = qS`` cost ``4·N·D·Dv`` against dense ``4·N²·D``."""
    return head_dim_v / num_tokens


# Prologue FLOPs of DyDiLA per token, per head-dim element, both sides: each of the four power maps costs 10 per
# element (relu, +eps, r² as mul+add, log2, ·γ, exp2, p² as mul+add, ·‖r‖/‖p‖; log2 and exp2 counted as one FLOP
# each, as dense attention's count leaves softmax's exp out entirely) and each of the two differentials 2 (·λ, −).
DYDILA_PROLOGUE_FLOPS = 4 * 10 + 2 * 2


def dydila_fraction(num_tokens: int, head_dim_v: int) -> float:
    """The linear core on ``Q̂, K̂`` (``4·N·D·Dv``) plus the prologue the spec makes part of the op (four power maps
    and two differentials, ``44·N·D``) against dense ``4·N²·D``: ``(Dv + 11) / N``."""
    return (head_dim_v + DYDILA_PROLOGUE_FLOPS / 4) / num_tokens
