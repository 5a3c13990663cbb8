"""Linear attention and DyDiLA as custom ops: ``difattn::linear_attention_fwd`` / ``_bwd`` and
``difattn::dydila_fwd`` / ``_bwd``.

``kernel="rust"`` runs the Rust CPU kernels, ``kernel="triton"`` the Triton kernels (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``). Inputs ``(B, H, N, D)`` / ``(B, H, N, Dv)`` with any strides, per-token parameters
``(B, H, N)`` in any float dtype (stride 0 allowed). The forward returns the output in q's dtype together with the
fp32 state ``S = (1/N) Σ K̂ᵀ V`` ``(B, H, D, Dv)`` and ``ksum = mean K̂`` ``(B, H, D)``, which the backward reuses
(they carry no gradient). The backward recomputes the DyDiLA prologue rather than saving ``Q̂``, ``K̂``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .. import reference
from .._native import core

PER_TOKEN = ("gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _desc(t: torch.Tensor) -> tuple[int, str, list[int], list[int]]:
    """The raw descriptor the compiled core validates: (data_ptr, dtype, shape, strides)."""
    return (t.data_ptr(), str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()))


def _state_like(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, _, D = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    return torch.empty(B, H, D, v.shape[3], **f32), torch.empty(B, H, D, **f32)


def _triton():
    from ..triton_kernels import linear_attention as tk

    return tk


# ------------------------------------------------------------------------------------------ linear attention


@torch.library.custom_op("difattn::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalize: bool, eps: float, kernel: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernel == "triton":
        return _triton().linear_fwd(q, k, v, normalize, eps)
    out = q.new_empty(*q.shape[:3], v.shape[3])
    state, ksum = _state_like(q, v)
    core().linear_attention_forward(
        _desc(q), _desc(k), _desc(v), _desc(out), _desc(state), _desc(ksum), normalize, eps, torch.get_num_threads()
    )
    return out, state, ksum


@linear_attention_fwd.register_fake
def _(q, k, v, normalize, eps, kernel):
    return (q.new_empty(*q.shape[:3], v.shape[3]), *_state_like(q, v))


@torch.library.custom_op("difattn::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor, dout: torch.Tensor,
    normalize: bool, eps: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernel == "triton":
        return _triton().linear_bwd(q, k, v, state, ksum, dout, normalize, eps)
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    core().linear_attention_backward(
        _desc(q), _desc(k), _desc(v), _desc(state), _desc(ksum), _desc(dout), _desc(dq), _desc(dk), _desc(dv),
        normalize, eps, torch.get_num_threads(),
    )
    return dq, dk, dv


@linear_attention_bwd.register_fake
def _(q, k, v, state, ksum, dout, normalize, eps, kernel):
    return tuple(torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))


def _linear_setup(ctx, inputs, output):
    q, k, v, normalize, eps, kernel = inputs
    _, state, ksum = output
    ctx.mark_non_differentiable(state, ksum)
    ctx.save_for_backward(q, k, v, state, ksum)
    ctx.options = (normalize, eps, kernel)


def _linear_backward(ctx, dout, _dstate, _dksum):
    q, k, v, state, ksum = ctx.saved_tensors
    dq, dk, dv = linear_attention_bwd(q, k, v, state, ksum, dout, *ctx.options)
    return dq, dk, dv, None, None, None


linear_attention_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------ DyDiLA


def _sides(q, k, q_aux, k_aux, params):
    """Descriptors of the two sides as the core takes them: ``(z, z_aux, gamma, gamma_aux, lambda)``."""
    gq, gk, gqa, gka, lq, lk = params
    return tuple(_desc(t) for t in (q, q_aux, gq, gqa, lq)), tuple(_desc(t) for t in (k, k_aux, gk, gka, lk))


@torch.library.custom_op("difattn::dydila_fwd", mutates_args=())
def dydila_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_aux: torch.Tensor, k_aux: torch.Tensor,
    gamma_q: torch.Tensor, gamma_k: torch.Tensor, gamma_q_aux: torch.Tensor, gamma_k_aux: torch.Tensor,
    lambda_q: torch.Tensor, lambda_k: torch.Tensor, normalize: bool, eps: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k)
    if kernel == "triton":
        return _triton().dydila_fwd(q, k, v, q_aux, k_aux, params, normalize, eps)
    out = q.new_empty(*q.shape[:3], v.shape[3])
    state, ksum = _state_like(q, v)
    q_side, k_side = _sides(q, k, q_aux, k_aux, params)
    core().dydila_forward(
        q_side, k_side, _desc(v), _desc(out), _desc(state), _desc(ksum), normalize, eps, torch.get_num_threads()
    )
    return out, state, ksum


@dydila_fwd.register_fake
def _(q, k, v, q_aux, k_aux, gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k, normalize, eps, kernel):
    return (q.new_empty(*q.shape[:3], v.shape[3]), *_state_like(q, v))


@torch.library.custom_op("difattn::dydila_bwd", mutates_args=())
def dydila_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_aux: torch.Tensor, k_aux: torch.Tensor,
    gamma_q: torch.Tensor, gamma_k: torch.Tensor, gamma_q_aux: torch.Tensor, gamma_k_aux: torch.Tensor,
    lambda_q: torch.Tensor, lambda_k: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor, dout: torch.Tensor,
    normalize: bool, eps: float, kernel: str,
) -> list[torch.Tensor]:
    """Gradients ``[dq, dk, dv, dq_aux, dk_aux, dγq, dγk, dγq_aux, dγk_aux, dλq, dλk]`` (per-token ones in fp32)."""
    params = (gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k)
    if kernel == "triton":
        return list(_triton().dydila_bwd(q, k, v, q_aux, k_aux, params, state, ksum, dout, normalize, eps))
    grads = _dydila_grads_like(q, v)
    dq, dk, dv, dq_aux, dk_aux, dgq, dgk, dgqa, dgka, dlq, dlk = grads
    q_side, k_side = _sides(q, k, q_aux, k_aux, params)
    core().dydila_backward(
        q_side, k_side, _desc(v), _desc(state), _desc(ksum), _desc(dout),
        tuple(_desc(t) for t in (dq, dq_aux, dgq, dgqa, dlq)), tuple(_desc(t) for t in (dk, dk_aux, dgk, dgka, dlk)),
        _desc(dv), normalize, eps, torch.get_num_threads(),
    )
    return grads


def _dydila_grads_like(q: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    like = dict(dtype=q.dtype, device=q.device)
    big = [torch.empty(q.shape, **like), torch.empty(q.shape, **like), torch.empty(v.shape, **like)]
    big += [torch.empty(q.shape, **like), torch.empty(q.shape, **like)]
    return big + [torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) for _ in PER_TOKEN]


@dydila_bwd.register_fake
def _(q, k, v, q_aux, k_aux, gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k, state, ksum, dout,
      normalize, eps, kernel):
    return _dydila_grads_like(q, v)


def _dydila_setup(ctx, inputs, output):
    *tensors, normalize, eps, kernel = inputs
    _, state, ksum = output
    ctx.mark_non_differentiable(state, ksum)
    ctx.save_for_backward(*tensors, state, ksum)
    ctx.options = (normalize, eps, kernel)
    ctx.param_dtypes = [t.dtype for t in tensors[5:]]


def _dydila_backward(ctx, dout, _dstate, _dksum):
    *tensors, state, ksum = ctx.saved_tensors
    grads = dydila_bwd(*tensors, state, ksum, dout, *ctx.options)
    per_token = [g.to(dtype) for g, dtype in zip(grads[5:], ctx.param_dtypes)]
    return (*grads[:5], *per_token, None, None, None)


dydila_fwd.register_autograd(_dydila_backward, setup_context=_dydila_setup)


# ------------------------------------------------------------------------------------------ backend implementations


def _per_token(value: torch.Tensor | float, q: torch.Tensor) -> torch.Tensor:
    """A ``(B, H, N)`` tensor the kernels read: floats expand (stride 0), float64 tensors become fp32."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype in _KERNEL_DTYPES else value.float()
    return torch.full((1, 1, 1), float(value), dtype=torch.float32, device=q.device).expand(q.shape[:3])


def linear_attention(q, k, v, *, normalize: bool, eps: float, kernel: str) -> torch.Tensor:
    """Same contract as :func:`difattn.linear_attention` (arguments validated); float64 runs the reference."""
    if q.dtype not in _KERNEL_DTYPES:
        return reference.linear_attention(q, k, v, normalize=normalize, eps=eps)
    out, _, _ = linear_attention_fwd(q, k, v, normalize, float(eps), kernel)
    return out


def dydila_attention(
    q, k, v, q_aux, k_aux, *, gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k,
    normalize: bool, eps: float, kernel: str,
) -> torch.Tensor:
    """Same contract as :func:`difattn.dydila_attention` (arguments validated); float64 runs the reference."""
    values = (gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k)
    if q.dtype not in _KERNEL_DTYPES:
        return reference.dydila_attention(q, k, v, q_aux, k_aux, **dict(zip(PER_TOKEN, values)),
                                          normalize=normalize, eps=eps)
    params = [_per_token(x, q) for x in values]
    out, _, _ = dydila_fwd(q, k, v, q_aux, k_aux, *params, normalize, float(eps), kernel)
    return out


def implementations(kernel: str) -> dict[str, Callable]:
    """The backend table's entries for ``kernel`` ("rust" or "triton")."""
    return {
        "linear": functools.partial(linear_attention, kernel=kernel),
        "dydila": functools.partial(dydila_attention, kernel=kernel),
    }
