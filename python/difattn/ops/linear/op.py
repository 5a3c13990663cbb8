"""Linear attention and DyDiLA as custom ops: ``difattn::linear_attention_fwd`` / ``_bwd`` and
``difattn::dydila_fwd`` / ``_bwd``.

Inputs q ``(B, H, N, D)``, k ``(B, H, Nk, D)``, v ``(B, H, Nk, Dv)`` (``Nk != N``: cross-attention) with any strides,
per-token parameters ``(B, H, N)`` / ``(B, H, Nk)`` by side in any float dtype (stride 0 allowed). The forward returns
the output in q's dtype together with the fp32 state ``S = (1/Nk) Σ K̂ᵀ V`` ``(B, H, D, Dv)`` and ``ksum = mean K̂``
``(B, H, D)``, which the backward reuses (they carry
no gradient). The backward recomputes the DyDiLA prologue rather than saving ``Q̂``, ``K̂``.
"""

from __future__ import annotations

import torch

from .._base.registry import launcher, register_lazy
from .rust_launch import dydila_grads_like, state_like

for _op in ("linear_forward", "linear_backward", "dydila_forward", "dydila_backward"):
    register_lazy(_op, "rust", f"{__package__}.rust_launch", _op)
register_lazy("linear_forward", "triton", "difattn.triton_kernels.linear_attention", "linear_fwd")
register_lazy("linear_backward", "triton", "difattn.triton_kernels.linear_attention", "linear_bwd")
register_lazy("dydila_forward", "triton", "difattn.triton_kernels.linear_attention", "dydila_fwd")
register_lazy("dydila_backward", "triton", "difattn.triton_kernels.linear_attention", "dydila_bwd")

PER_TOKEN = ("gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k")


@torch.library.custom_op("difattn::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalize: bool, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launcher("linear_forward", backend)(q, k, v, normalize, eps)


@linear_attention_fwd.register_fake
def _(q, k, v, normalize, eps, backend):
    return (q.new_empty(*q.shape[:3], v.shape[3]), *state_like(q, v))


@torch.library.custom_op("difattn::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor, dout: torch.Tensor,
    normalize: bool, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launcher("linear_backward", backend)(q, k, v, state, ksum, dout, normalize, eps)


@linear_attention_bwd.register_fake
def _(q, k, v, state, ksum, dout, normalize, eps, backend):
    return tuple(torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))


def _linear_setup(ctx, inputs, output):
    q, k, v, normalize, eps, backend = inputs
    _, state, ksum = output
    ctx.mark_non_differentiable(state, ksum)
    ctx.save_for_backward(q, k, v, state, ksum)
    ctx.options = (normalize, eps, backend)


def _linear_backward(ctx, dout, _dstate, _dksum):
    q, k, v, state, ksum = ctx.saved_tensors
    dq, dk, dv = linear_attention_bwd(q, k, v, state, ksum, dout, *ctx.options)
    return dq, dk, dv, None, None, None


linear_attention_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("difattn::dydila_fwd", mutates_args=())
def dydila_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_aux: torch.Tensor, k_aux: torch.Tensor,
    gamma_q: torch.Tensor, gamma_k: torch.Tensor, gamma_q_aux: torch.Tensor, gamma_k_aux: torch.Tensor,
    lambda_q: torch.Tensor, lambda_k: torch.Tensor, normalize: bool, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k)
    return launcher("dydila_forward", backend)(q, k, v, q_aux, k_aux, params, normalize, eps)


@dydila_fwd.register_fake
def _(q, k, v, q_aux, k_aux, gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k, normalize, eps, backend):
    return (q.new_empty(*q.shape[:3], v.shape[3]), *state_like(q, v))


@torch.library.custom_op("difattn::dydila_bwd", mutates_args=())
def dydila_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_aux: torch.Tensor, k_aux: torch.Tensor,
    gamma_q: torch.Tensor, gamma_k: torch.Tensor, gamma_q_aux: torch.Tensor, gamma_k_aux: torch.Tensor,
    lambda_q: torch.Tensor, lambda_k: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor, dout: torch.Tensor,
    normalize: bool, eps: float, backend: str,
) -> list[torch.Tensor]:
    """Gradients ``[dq, dk, dv, dq_aux, dk_aux, dγq, dγk, dγq_aux, dγk_aux, dλq, dλk]`` (per-token ones in fp32)."""
    params = (gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k)
    return list(launcher("dydila_backward", backend)(q, k, v, q_aux, k_aux, params, state, ksum, dout, normalize, eps))


@dydila_bwd.register_fake
def _(q, k, v, q_aux, k_aux, gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k, state, ksum, dout,
      normalize, eps, backend):
    return dydila_grads_like(q, k, v)


def _dydila_setup(ctx, inputs, output):
    *tensors, normalize, eps, backend = inputs
    _, state, ksum = output
    ctx.mark_non_differentiable(state, ksum)
    ctx.save_for_backward(*tensors, state, ksum)
    ctx.options = (normalize, eps, backend)
    ctx.param_dtypes = [t.dtype for t in tensors[5:]]


def _dydila_backward(ctx, dout, _dstate, _dksum):
    *tensors, state, ksum = ctx.saved_tensors
    grads = dydila_bwd(*tensors, state, ksum, dout, *ctx.options)
    per_token = [g.to(dtype) for g, dtype in zip(grads[5:], ctx.param_dtypes)]
    return (*grads[:5], *per_token, None, None, None)


dydila_fwd.register_autograd(_dydila_backward, setup_context=_dydila_setup)
