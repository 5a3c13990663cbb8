"""Halo rows: each rank of a stripe layout gets the image rows around its stripe that its computation reads.

A rank whose stripe is ``[y0, y1)`` asks for the rows ``[e0, e1) ⊇ [y0, y1)`` (``wants[r]``, known to every rank
since it depends only on the layout and the method's options) and receives them from whichever ranks own them, in
one all-to-all; a halo wider than the neighbour's stripe simply comes from several ranks. The all-to-all's
autograd returns the halo's gradients to their owners.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._comm import Comm
from ._layout import Layout, Span


def _overlap(a: Span, b: Span) -> Span | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def exchange_rows(comm: Comm, layout: Layout, x: torch.Tensor, axis: int, wants: Sequence[Span]) -> torch.Tensor:
    """``x`` holds this rank's stripe rows at dim ``axis``; returns rows ``wants[rank]`` (along the same dim)."""
    me = comm.rank
    own = layout.rows[me]
    send: list[torch.Tensor | None] = [None] * comm.world
    shapes: list[tuple[int, ...] | None] = [None] * comm.world
    for s in range(comm.world):
        if s == me:
            continue
        give = _overlap(wants[s], own)
        if give is not None:
            send[s] = x.narrow(axis, give[0] - own[0], give[1] - give[0]).contiguous()
        take = _overlap(wants[me], layout.rows[s])
        if take is not None:
            shapes[s] = x.shape[:axis] + (take[1] - take[0],) + x.shape[axis + 1 :]
    send[me] = x
    pieces = comm.all_to_all(send, shapes)
    # Stripes ascend with the rank, so the pieces in rank order are the wanted rows in order.
    return torch.cat([p for p in pieces if p is not None], dim=axis)


def clip(span: Span, height: int) -> Span:
    return max(0, span[0]), min(height, span[1])
