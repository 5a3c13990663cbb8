"""A "same" 2-D convolution of the image tokens on row stripes (the depthwise conv of LiT and DyDiLA on V).

A ``k x k`` conv reads ``k // 2`` rows above and below each row, so each rank receives that halo of its stripe
(:mod:`._rows`), convolves the extended stripe with the layer's own zero padding, and keeps its rows: at a true
border the padding is the grid's, elsewhere the padded rows only reach halo rows, whose outputs are dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..grid import TokenGrid
from ._comm import Comm
from ._layout import Layout
from ._rows import clip, exchange_rows


def conv_on_stripes(
    conv: nn.Conv2d, tokens: torch.Tensor, grid: TokenGrid, *, process_group: Any = None
) -> torch.Tensor:
    """``conv`` over the image tokens of this rank's shard ``tokens (B, n_r, C)`` of ``grid``; text rows get zeros.

    Equals the same rows of the conv of the full token grid, each frame on its own. Returns ``(B, n_r, C)``.
    """
    comm = Comm(process_group)
    layout = Layout.stripes(grid, comm.world)
    n_text, n_image = layout.local_split(comm.rank)
    B, _, C = tokens.shape
    image = slice(n_text, n_text + n_image) if layout.text_first() else slice(0, n_image)
    reach = max(conv.kernel_size) // 2
    wants = tuple(clip((y0 - reach, y1 + reach), grid.height) for y0, y1 in layout.rows)
    (y0, y1), (e0, e1) = layout.rows[comm.rank], wants[comm.rank]
    stripe = tokens[:, image].reshape(B, grid.frames, y1 - y0, grid.width, C)
    extended = exchange_rows(comm, layout, stripe, 2, wants)  # (B, F, e1 - e0, W, C)
    frames = extended.reshape(B * grid.frames, e1 - e0, grid.width, C).permute(0, 3, 1, 2)
    out = conv(frames).permute(0, 2, 3, 1)[:, y0 - e0 : y1 - e0].reshape(B, n_image, C)
    if not n_text:
        return out
    text = out.new_zeros(B, n_text, C)
    return torch.cat((text, out) if layout.text_first() else (out, text), dim=1)
