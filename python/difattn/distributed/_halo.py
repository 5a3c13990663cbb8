"""Halo exchange for the local methods: CLEAR's discs and GRAT's neighbouring groups.

On a stripe layout an image query of rank r only reads image keys within a few rows of its stripe ``[y0, y1)``:
CLEAR with radius r reads rows ``|dy| <= h``, ``h² <= ceil(r²) − 1`` (the integer form of ``dy² + dx² < r²``
with ``dx = 0``); GRAT's neighbours pattern reads the group rows within ``reach`` of its own, i.e. whole groups
of ``gh`` rows. The rank receives those rows of K and V (:mod:`._rows`) and every text key and value (all-gathered:
image queries see all text), then runs the public method on the grid of its extended stripe (halo rows, its
rows, halo rows; all text) and keeps its own image queries' outputs. Every image query of the stripe sees exactly
the keys it sees on the full grid, at the same relative positions, clipped at the same true borders; GRAT's
extended stripe starts on a group boundary so groups are the same. The other queries of the extended grid (halo
rows, text) are zeros and their outputs are dropped: the public functions are self-attention, so the halo rows'
queries cost ``(rows + 2 halo) / rows`` of the image work, the price of moving fewer bytes than Ulysses. Text
queries are computed by :mod:`._text`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .._options import clear_thresholds
from ..grid import TokenGrid
from ._comm import Comm
from ._layout import Layout, Span
from ._rows import clip, exchange_rows
from ._text import text_outputs

RunExtended = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenGrid], torch.Tensor]


def clear_wants(layout: Layout, radius: float) -> tuple[Span, ...]:
    """Rows each rank reads for CLEAR: its stripe widened by ``h = floor(sqrt(ceil(r²) − 1))`` rows."""
    reach = math.isqrt(clear_thresholds(radius, 1.0)[0])
    return tuple(clip((y0 - reach, y1 + reach), layout.grid.height) for y0, y1 in layout.rows)


def grat_wants(layout: Layout, group_rows: int, reach: int) -> tuple[Span, ...]:
    """Rows each rank reads for GRAT neighbours: the groups within ``reach`` group rows of its stripe's groups."""
    gh = group_rows
    return tuple(
        clip(((y0 // gh - reach) * gh, ((y1 - 1) // gh + reach + 1) * gh), layout.grid.height)
        for y0, y1 in layout.rows
    )


def halo_bytes(layout: Layout, wants: tuple[Span, ...], heads: int, kv_dim: int, itemsize: int) -> int:
    """Most K/V halo bytes any rank receives (the figure ``scheme="auto"`` weighs against Ulysses)."""
    g = layout.grid
    rows = max((e1 - e0) - (y1 - y0) for (e0, e1), (y0, y1) in zip(wants, layout.rows))
    return rows * g.frames * g.width * heads * kv_dim * itemsize


def halo_attention(
    comm: Comm,
    layout: Layout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    wants: tuple[Span, ...],
    run: RunExtended,
    scale: float,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(B, H, n_r, Dv)`` output shard of a local method; ``run`` calls the method on an extended grid."""
    g, me = layout.grid, comm.rank
    (y0, y1), (e0, e1) = layout.rows[me], wants[me]
    n_text, n_image = layout.local_split(me)
    B, H, _, D = q.shape
    Dv = v.shape[-1]
    text_part = slice(0, n_text) if layout.text_first() else slice(n_image, n_image + n_text)
    image_part = slice(n_text, n_text + n_image) if layout.text_first() else slice(0, n_image)

    def on_grid(x: torch.Tensor) -> torch.Tensor:  # (B, H, F*rows*W, d) -> (B, H, F, rows, W, d)
        return x[:, :, image_part].reshape(B, H, g.frames, -1, g.width, x.shape[-1])

    kv = exchange_rows(comm, layout, on_grid(torch.cat([k, v], dim=-1)), 3, wants)
    q_image = F.pad(on_grid(q), (0, 0, 0, 0, y0 - e0, e1 - y1))  # zero queries on the halo rows
    q_ext, kv_ext = q_image.flatten(2, 4), kv.flatten(2, 4)
    valid = None
    if g.text_tokens:
        local = torch.cat([q, k, v], dim=-1)[:, :, text_part]
        shapes = [(B, H, t1 - t0, local.shape[-1]) for t0, t1 in layout.text]
        text = torch.cat(comm.all_gather(local, shapes), dim=2)  # (B, H, T, 2D + Dv), every text token
        q_text, kv_text = text.split([D, D + Dv], dim=-1)
        pair = (kv_text, kv_ext) if layout.text_first() else (kv_ext, kv_text)
        kv_ext = torch.cat(pair, dim=2)
        zeros = q_text.new_zeros(B, H, g.text_tokens, D)
        q_ext = torch.cat((zeros, q_ext) if layout.text_first() else (q_ext, zeros), dim=2)
        if text_mask is not None:
            t0, t1 = layout.text[me]
            valid = torch.ones(B, n_text + n_image, dtype=torch.bool, device=q.device)
            valid[:, text_part] = text_mask[:, t0:t1]
    k_ext, v_ext = kv_ext.split([D, Dv], dim=-1)
    grid_ext = TokenGrid(e1 - e0, g.width, g.frames, g.text_tokens, g.text_position)
    out_ext = run(q_ext, k_ext, v_ext, grid_ext)
    image_ext = slice(grid_ext.image_range.start, grid_ext.image_range.stop)
    out = out_ext[:, :, image_ext].reshape(B, H, g.frames, e1 - e0, g.width, Dv)[:, :, :, y0 - e0 : y1 - e0]
    out = out.flatten(2, 4)
    if not g.text_tokens:
        return out
    text_out = text_outputs(comm, layout, q_text, k, v, valid, scale)
    return torch.cat((text_out, out) if layout.text_first() else (out, text_out), dim=2)
