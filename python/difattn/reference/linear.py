"""Non-causal linear attention in plain torch (LiT's kernel; features already applied)."""

from __future__ import annotations

import torch

from .._feature_maps import accumulation_dtype
from .._options import check_linear


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``O = q S`` with the state ``S = (1/Nk) Σ_n k_nᵀ v_n``, optionally ``O / (q · mean_n(k) + eps)``.

    Args:
        q: ``(B, H, N, D)``, k: ``(B, H, Nk, D)`` features (no activation is applied here); v: ``(B, H, Nk, Dv)``.

    The state and the output are computed in float32 (float64 for float64 inputs). Returns ``(B, H, N, Dv)`` in
    q's dtype.
    """
    eps = check_linear(normalize, eps)
    out_dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    state = k.transpose(-1, -2) @ v / k.shape[2]  # (B, H, D, Dv)
    out = q @ state
    if normalize:
        out = out / (q @ k.mean(dim=2).unsqueeze(-1) + eps)  # (B, H, N, 1) denominator
    return out.to(out_dtype)
