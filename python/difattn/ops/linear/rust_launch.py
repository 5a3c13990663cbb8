"""Linear attention's and DyDiLA's Rust CPU launchers (the same signatures as the Triton launchers in
``difattn.triton_kernels.linear_attention``)."""

from __future__ import annotations

import torch

from ..._native import core
from .._base.descriptors import tensor_desc


def state_like(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty fp32 ``S (B, H, D, Dv)`` and ``ksum (B, H, D)``."""
    B, H, _, D = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    return torch.empty(B, H, D, v.shape[3], **f32), torch.empty(B, H, D, **f32)


def dydila_grads_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """Empty ``[dq, dk, dv, dq_aux, dk_aux]`` (q's dtype) and the per-token gradients ``[dγq, dγk, dγq_aux, dγk_aux,
    dλq, dλk]`` fp32, ``(B, H, N)`` on the query side and ``(B, H, Nk)`` on the key side."""
    like = dict(dtype=q.dtype, device=q.device)
    big = [torch.empty(q.shape, **like), torch.empty(k.shape, **like), torch.empty(v.shape, **like)]
    big += [torch.empty(q.shape, **like), torch.empty(k.shape, **like)]
    sides = (q, k, q, k, q, k)
    return big + [torch.empty(x.shape[:3], dtype=torch.float32, device=q.device) for x in sides]


def linear_forward(q, k, v, normalize: bool, eps: float):
    out = q.new_empty(*q.shape[:3], v.shape[3])
    state, ksum = state_like(q, v)
    core().linear_attention_forward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(out), tensor_desc(state), tensor_desc(ksum),
        normalize, eps, torch.get_num_threads(),
    )
    return out, state, ksum


def linear_backward(q, k, v, state, ksum, dout, normalize: bool, eps: float):
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    core().linear_attention_backward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(state), tensor_desc(ksum), tensor_desc(dout),
        tensor_desc(dq), tensor_desc(dk), tensor_desc(dv), normalize, eps, torch.get_num_threads(),
    )
    return dq, dk, dv


def _sides(q, k, q_aux, k_aux, params):
    """Descriptors of the two sides as the core takes them: ``(z, z_aux, gamma, gamma_aux, lambda)``."""
    gq, gk, gqa, gka, lq, lk = params
    return (tuple(tensor_desc(t) for t in (q, q_aux, gq, gqa, lq)),
            tuple(tensor_desc(t) for t in (k, k_aux, gk, gka, lk)))


def dydila_forward(q, k, v, q_aux, k_aux, params, normalize: bool, eps: float):
    out = q.new_empty(*q.shape[:3], v.shape[3])
    state, ksum = state_like(q, v)
    q_side, k_side = _sides(q, k, q_aux, k_aux, params)
    core().dydila_forward(
        q_side, k_side, tensor_desc(v), tensor_desc(out), tensor_desc(state), tensor_desc(ksum), normalize, eps,
        torch.get_num_threads(),
    )
    return out, state, ksum


def dydila_backward(q, k, v, q_aux, k_aux, params, state, ksum, dout, normalize: bool, eps: float):
    grads = dydila_grads_like(q, k, v)
    dq, dk, dv, dq_aux, dk_aux, dgq, dgk, dgqa, dgka, dlq, dlk = grads
    q_side, k_side = _sides(q, k, q_aux, k_aux, params)
    core().dydila_backward(
        q_side, k_side, tensor_desc(v), tensor_desc(state), tensor_desc(ksum), tensor_desc(dout),
        tuple(tensor_desc(t) for t in (dq, dq_aux, dgq, dgqa, dlq)),
        tuple(tensor_desc(t) for t in (dk, dk_aux, dgk, dgka, dlk)), tensor_desc(dv), normalize, eps,
        torch.get_num_threads(),
    )
    return grads
