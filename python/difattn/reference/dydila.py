"""DyDiLA in plain torch: power maps, token differential, linear attention."""

from __future__ import annotations

import torch

from .._checks import check_float
from .._feature_maps import PerToken, accumulation_dtype, column, power_map
from .._options import check_linear
from .linear import linear_attention

__all__ = ["dydila_attention", "power_map"]


def _check_per_token(name: str, value: PerToken, tokens: torch.Size) -> None:
    if not isinstance(value, torch.Tensor):
        check_float(name, value)
    elif value.shape != tokens:
        raise ValueError(f"{name} must be a float or a (B, H, N) = {tuple(tokens)} tensor, got {tuple(value.shape)}")


def dydila_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_aux: torch.Tensor,
    k_aux: torch.Tensor,
    *,
    gamma_q: PerToken,
    gamma_k: PerToken,
    gamma_q_aux: PerToken,
    gamma_k_aux: PerToken,
    lambda_q: PerToken,
    lambda_k: PerToken,
    normalize: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Dynamic differential linear attention::

        Q̂ = φ_γq(q) − λ_q φ_γq_aux(q_aux),   K̂ = φ_γk(k) − λ_k φ_γk_aux(k_aux)
        O = Q̂ S,  S = (1/Nk) Σ_n K̂_nᵀ v_n     (normalize: O / (Q̂ · mean_n(K̂) + eps))

    Args:
        q, q_aux: ``(B, H, N, D)``; k, k_aux: ``(B, H, Nk, D)``; v: ``(B, H, Nk, Dv)`` (``Nk != N``:
            cross-attention).
        gamma_*, lambda_*: tensors of their side's tokens (one value per token and head), ``(B, H, N)`` for the
            query side, ``(B, H, Nk)`` for the key side, or floats.

    Differentiable in every tensor input, gammas and lambdas included. Computed in float32 (float64 for float64
    inputs); returns ``(B, H, N, Dv)`` in q's dtype.
    """
    eps = check_linear(normalize, eps)
    if q_aux.shape != q.shape or k_aux.shape != k.shape:
        raise ValueError(
            f"q_aux and k_aux must have the shapes of q {tuple(q.shape)} and k {tuple(k.shape)}, "
            f"got {tuple(q_aux.shape)} and {tuple(k_aux.shape)}"
        )
    per_token = {
        "gamma_q": gamma_q,
        "gamma_k": gamma_k,
        "gamma_q_aux": gamma_q_aux,
        "gamma_k_aux": gamma_k_aux,
        "lambda_q": lambda_q,
        "lambda_k": lambda_k,
    }
    for name, value in per_token.items():
        _check_per_token(name, value, (k if "_k" in name else q).shape[:3])
    acc = accumulation_dtype(q.dtype)
    q_hat = power_map(q.to(acc), gamma_q, eps) - column(lambda_q, acc) * power_map(q_aux.to(acc), gamma_q_aux, eps)
    k_hat = power_map(k.to(acc), gamma_k, eps) - column(lambda_k, acc) * power_map(k_aux.to(acc), gamma_k_aux, eps)
    return linear_attention(q_hat, k_hat, v.to(acc), normalize=normalize, eps=eps).to(q.dtype)
