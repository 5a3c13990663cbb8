"""Text queries of the local methods (CLEAR, GRAT) on a stripe layout.

A text query attends every (valid) key of the sequence, which is spread over all ranks. Every rank computes, for
all text queries (gathered, the text is short), softmax attention over the keys it owns (its text run and its
stripe) together with the log-sum-exp of those logits; the partial results are sent to the ranks that own the
queries, which merge them exactly: ``o = Σ_r e^{lse_r − m} o_r / Σ_r e^{lse_r − m}``, ``m = max_r lse_r``.
Each key is owned by one rank, so every key enters each softmax exactly once. Computed in float32 (float64 for
float64 inputs) in plain torch: a text row of CLEAR or GRAT is dense attention.
"""

from __future__ import annotations

import torch

from ._comm import Comm
from ._layout import Layout


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float):
    """Softmax attention of ``q (B, H, T, D)`` over ``k, v (B, H, n, ·)`` and its log-sum-exp ``(B, H, T, 1)``."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.exp(logits - lse) @ v, lse


def text_outputs(
    comm: Comm,
    layout: Layout,
    q_text: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Outputs of this rank's text queries, ``(B, H, T_r, Dv)`` in q's dtype.

    ``q_text``: every text query ``(B, H, T, D)``; ``k, v``: this rank's keys and values (its whole shard);
    ``valid``: ``(B, n_r)`` bool, False at padded text keys of the shard, or None.
    """
    acc = torch.float64 if q_text.dtype == torch.float64 else torch.float32
    out, lse = _partial(q_text.to(acc), k.to(acc), v.to(acc), valid, scale)
    packed = torch.cat([out, lse], dim=-1)  # (B, H, T, Dv + 1)
    B, H, _, width = packed.shape
    t0, t1 = layout.text[comm.rank]
    send = [packed[:, :, a:b] for a, b in layout.text]
    pieces = torch.stack(comm.all_to_all(send, [(B, H, t1 - t0, width)] * comm.world))  # (P, B, H, T_r, Dv + 1)
    outs, lses = pieces[..., :-1], pieces[..., -1:]
    weights = torch.exp(lses - lses.amax(dim=0))
    return ((weights * outs).sum(dim=0) / weights.sum(dim=0)).to(q_text.dtype)
