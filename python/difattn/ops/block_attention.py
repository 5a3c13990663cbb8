"""The attention engine as custom ops: ``difattn::block_attention_fwd`` / ``_bwd`` over a block plan.

``kernel="rust"`` runs the Rust CPU kernels, ``kernel="triton"`` the Triton kernels (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``). Both take q, k, v in ``(B, H, N, D)``
with any strides and gather rows through the plan's permutations (no permuted copies). The forward returns the
output in q's dtype and the log-sum-exp (fp32) that the backward reuses. ``max_blocks`` (query and key block
sizes) must be at least the plan's largest blocks: the Triton tiles are sized from it without a device sync.
"""

from __future__ import annotations

import torch

from .._native import core
from .block_plan import PLAN_FIELDS, BlockPlan


def _desc(t: torch.Tensor) -> tuple[int, str, list[int], list[int]]:
    """The raw descriptor the compiled core validates: (data_ptr, dtype, shape, strides)."""
    return (t.data_ptr(), str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()))


def _plan_args(plan: list[torch.Tensor]):
    by_name = dict(zip(PLAN_FIELDS, plan))
    names = ("q_perm", "q_offsets", "k_perm", "k_offsets", "indptr", "indices", "kinds", "q_coords", "k_coords")
    return tuple(_desc(by_name[n].contiguous()) for n in names)


@torch.library.custom_op("difattn::block_attention_fwd", mutates_args=())
def block_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[torch.Tensor], key_valid: torch.Tensor | None,
    max_d2: int, max_dt: int, max_blocks: list[int], scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel == "triton":
        from ..triton_kernels import block_attention as tk

        return tk.block_attention_fwd(q, k, v, plan, key_valid, max_d2, max_dt, max_blocks, scale)
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    valid = None if key_valid is None else _desc(key_valid.contiguous())
    core().block_attention_forward(
        _desc(q), _desc(k), _desc(v), _desc(out), _desc(lse), _plan_args(plan), valid, max_d2, max_dt, scale,
        torch.get_num_threads(),
    )
    return out, lse


@block_attention_fwd.register_fake
def _(q, k, v, plan, key_valid, max_d2, max_dt, max_blocks, scale, kernel):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("difattn::block_attention_bwd", mutates_args=())
def block_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
    plan: list[torch.Tensor], key_valid: torch.Tensor | None, max_d2: int, max_dt: int, max_blocks: list[int],
    scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernel == "triton":
        from ..triton_kernels import block_attention as tk

        return tk.block_attention_bwd(q, k, v, out, dout, lse, plan, key_valid, max_d2, max_dt, max_blocks, scale)
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    valid = None if key_valid is None else _desc(key_valid.contiguous())
    core().block_attention_backward(
        _desc(q), _desc(k), _desc(v), _desc(dout), _desc(lse), _desc(delta), _desc(dq), _desc(dk), _desc(dv),
        _plan_args(plan), valid, max_d2, max_dt, scale, torch.get_num_threads(),
    )
    return dq, dk, dv


@block_attention_bwd.register_fake
def _(q, k, v, out, dout, lse, plan, key_valid, max_d2, max_dt, max_blocks, scale, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, plan, key_valid, max_d2, max_dt, max_blocks, scale, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_valid, *plan)
    ctx.options = (max_d2, max_dt, max_blocks, scale, kernel)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_valid, *plan = ctx.saved_tensors
    max_d2, max_dt, max_blocks, scale, kernel = ctx.options
    dq, dk, dv = block_attention_bwd(
        q, k, v, out, dout.contiguous(), lse, plan, key_valid, max_d2, max_dt, max_blocks, scale, kernel
    )
    return dq, dk, dv, [None] * len(plan), None, None, None, None, None, None


block_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, *, scale: float,
                    kernel: str, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query over the keys its plan allows, with the ``"rust"`` or ``"triton"`` kernels.
    ``key_valid``: ``(B, Nk)`` bool in the key layout's order, applied on masked entries. Returns ``(B, H, N, Dv)``."""
    out, _ = block_attention_fwd(
        q, k, v, list(plan.tensors), key_valid, plan.max_d2, plan.max_dt, list(plan.max_blocks), float(scale), kernel
    )
    return out
