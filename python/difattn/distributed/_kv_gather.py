"""Dense attention with every rank's keys and values all-gathered: the baseline Ulysses and the halo are compared
with (each rank receives the whole K and V, ``(P − 1) / P`` of them from others; diffusers' "ring" moves the same)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._comm import Comm
from ._layout import Layout


def dense_kv_gather(comm: Comm, layout: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    """``(B, H, n_r, Dv)``: SDPA of the local queries over the gathered full K, V (in full order)."""
    B, H, _, D = k.shape
    kv = torch.cat([k, v], dim=-1)
    shapes = [(B, H, layout.count(s), kv.shape[-1]) for s in range(comm.world)]
    full = torch.cat(comm.all_gather(kv, shapes), dim=2).index_select(2, layout.to_full(kv.device))
    k_full, v_full = full.split([D, v.shape[-1]], dim=-1)
    return F.scaled_dot_product_attention(q, k_full, v_full, scale=scale)
