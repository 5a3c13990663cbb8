"""Linear attention and DyDiLA by an all-reduce of the per-head state instead of moving tokens.

Non-causal linear attention reads the keys only through ``S = Σ_n k_nᵀ v_n`` (``(D, Dv)`` per head), ``z = Σ_n k_n``
and the count N. Each rank sums its own tokens' terms and one all-reduce adds them up (its size is independent of
N); then ``O = q S / N`` (normalised: ``/ (q · z / N + eps)``) for the local queries. The all-reduce's autograd
all-reduces the state's gradient. DyDiLA is linear attention on the features ``Q̂ = φ(q) − λ_q φ(q_aux)``,
``K̂ = φ(k) − λ_k φ(k_aux)``, which are per token and so computed locally (the power maps the reference uses).
The public functions reduce over the tokens they are given, so this scheme is the same formula in plain torch,
in float32 (float64 for float64 inputs) like the kernels' accumulators; tests hold it to the single-process call.
"""

from __future__ import annotations

import torch

from .._feature_maps import PerToken, accumulation_dtype, column, power_map
from ._comm import Comm


def linear_state(
    comm: Comm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool, eps: float
) -> torch.Tensor:
    """``(B, H, n_r, Dv)`` linear attention outputs of the local queries over every rank's keys."""
    acc = accumulation_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    B, H, n, D = ka.shape
    Dv = va.shape[-1]
    state = ka.transpose(-1, -2) @ va  # (B, H, D, Dv)
    count = ka.new_full((1,), n)
    total = comm.all_reduce(torch.cat([state.reshape(-1), ka.sum(dim=2).reshape(-1), count]))
    state, key_sum, count = total.split([B * H * D * Dv, B * H * D, 1])
    out = qa @ (state.view(B, H, D, Dv) / count)
    if normalize:
        out = out / (qa @ (key_sum.view(B, H, D, 1) / count) + eps)
    return out.to(q.dtype)


def _differential(z: torch.Tensor, z_aux: torch.Tensor, gamma: PerToken, gamma_aux: PerToken, lam: PerToken,
                  eps: float, acc: torch.dtype) -> torch.Tensor:
    """``φ_γ(z) − λ φ_γaux(z_aux)`` in ``acc``; per-token values are ``(B, H, n)`` tensors or floats."""
    return power_map(z.to(acc), gamma, eps) - column(lam, acc) * power_map(z_aux.to(acc), gamma_aux, eps)


def dydila_state(
    comm: Comm,
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
    normalize: bool,
    eps: float,
) -> torch.Tensor:
    """``(B, H, n_r, Dv)`` DyDiLA outputs of the local queries; every input is this rank's shard."""
    acc = accumulation_dtype(q.dtype)
    q_hat = _differential(q, q_aux, gamma_q, gamma_q_aux, lambda_q, eps, acc)
    k_hat = _differential(k, k_aux, gamma_k, gamma_k_aux, lambda_k, eps, acc)
    return linear_state(comm, q_hat, k_hat, v.to(acc), normalize=normalize, eps=eps).to(q.dtype)
