"""Ulysses: an all-to-all turns sequence shards of every head into the full sequence of a share of the heads.

Exact for every method, since each rank then runs the method on the whole sequence (in the full order, whatever
the layout) for its heads; a second all-to-all brings the outputs back to the sequence shards. Heads are split
as ``torch.tensor_split`` splits them, so a head count that does not divide by the world size works (the first
``H % P`` ranks get one more head).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._comm import Comm
from ._layout import Layout, balanced


def _to_heads(comm: Comm, layout: Layout, x: torch.Tensor, heads: tuple) -> torch.Tensor:
    """``(B, H, n_r, d)`` shards -> ``(B, H_r, N, d)``: this rank's heads over the full sequence, in full order."""
    send = [x[:, h0:h1] for h0, h1 in heads]
    h0, h1 = heads[comm.rank]
    shapes = [(x.shape[0], h1 - h0, layout.count(s), x.shape[3]) for s in range(comm.world)]
    pieces = comm.all_to_all(send, shapes)
    return torch.cat(pieces, dim=2).index_select(2, layout.to_full(x.device))


def _to_sequence(comm: Comm, layout: Layout, out: torch.Tensor, heads: tuple) -> torch.Tensor:
    """``(B, H_r, N, dv)`` -> ``(B, H, n_r, dv)``: every head's outputs for this rank's tokens."""
    send = [out.index_select(2, layout.indices(s, out.device)) for s in range(comm.world)]
    n = layout.count(comm.rank)
    shapes = [(out.shape[0], h1 - h0, n, out.shape[3]) for h0, h1 in heads]
    return torch.cat(comm.all_to_all(send, shapes), dim=1)


def ulysses(
    comm: Comm,
    layout: Layout,
    inputs: Sequence[torch.Tensor],
    compute: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Run ``compute(*full_inputs)`` on this rank's heads of the full sequence.

    ``inputs``: ``(B, H, n_r, d_i)`` shards (same B, H; H >= the world size); those of one dtype travel in
    one all-to-all. ``compute`` returns ``(B, H_r, N, Dv)``. Returns the
    ``(B, H, n_r, Dv)`` shard of the output.
    """
    H = inputs[0].shape[1]
    heads = balanced(H, comm.world)
    full: list[torch.Tensor | None] = [None] * len(inputs)
    for dtype in dict.fromkeys(x.dtype for x in inputs):  # one all-to-all per dtype, first-seen order
        group = [i for i, x in enumerate(inputs) if x.dtype == dtype]
        packed = _to_heads(comm, layout, torch.cat([inputs[i] for i in group], dim=-1), heads)
        for i, part in zip(group, packed.split([inputs[i].shape[-1] for i in group], dim=-1)):
            full[i] = part
    out = compute(*full)
    return _to_sequence(comm, layout, out, heads)
