"""CLEAR's global tokens (learnable ``d x d`` poolings of the image keys and values) from row stripes.

A pooling window is a weighted sum, so each rank pools the rows of its stripe into the windows they fall in (a
window cut by a stripe boundary gets a partial sum from each side), and one all-reduce adds them up: every rank
then holds all global tokens, as :func:`difattn.clear_global_kv` computes them on the full grid. The
all-reduce's autograd adds every rank's use of the tokens back onto each contribution.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..functional import clear_global_kv
from ..grid import TokenGrid
from ._comm import Comm
from ._layout import Layout


def global_kv_on_stripes(
    k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, spatial_weight: torch.Tensor, *, process_group: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_g, v_g)`` of the full ``grid`` from this rank's shards ``k, v (B, H, n_r, ·)``, on every rank."""
    comm = Comm(process_group)
    layout = Layout.stripes(grid, comm.world)
    d = spatial_weight.shape[3]
    (y0, y1), (n_text, n_image) = layout.rows[comm.rank], layout.local_split(comm.rank)
    B, H, _, D = k.shape
    image = slice(n_text, n_text + n_image) if layout.text_first() else slice(0, n_image)
    stripe = torch.cat([k, v], dim=-1)[:, :, image].reshape(B, H, grid.frames, y1 - y0, grid.width, -1)
    # Zero rows above the stripe align its rows with the windows of the full grid (window row = y // d).
    top = y0 % d
    aligned = F.pad(stripe, (0, 0, 0, 0, top, 0)).flatten(2, 4)
    pooled_k, pooled_v = clear_global_kv(*aligned.split([D, v.shape[-1]], dim=-1),
                                         TokenGrid(top + y1 - y0, grid.width, grid.frames), spatial_weight)
    pooled = torch.cat([pooled_k, pooled_v], dim=-1)
    window_rows, window_cols = math.ceil(grid.height / d), math.ceil(grid.width / d)
    first, count = y0 // d, math.ceil((top + y1 - y0) / d)
    pooled = pooled.reshape(B, H, grid.frames, count, window_cols, -1)
    full = F.pad(pooled, (0, 0, 0, 0, first, window_rows - first - count)).flatten(2, 4)
    return comm.all_reduce(full).split([D, v.shape[-1]], dim=-1)
