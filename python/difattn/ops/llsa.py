"""LLSA as custom ops: ``difattn::llsa_fwd`` / ``difattn::llsa_bwd`` over a selection, and the method on them.

``kernel="rust"`` runs the Rust CPU kernels, ``kernel="triton"`` the Triton kernels (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). The ops take the fine ``q, k, v`` (any strides) and the pooled keys and values of every level
``kp, vp`` (``(B, H, P, ·)``, built by differentiable torch ops, so the mean-pool backward is autograd's), plus the
plan ``[fine, pooled, pb_offsets, pbias]`` of :mod:`.llsa_plan`. The forward returns the output (q's dtype) and the
log-sum-exp (fp32); the backward returns the gradients of q, k, v through the fine keys and of kp, vp.
"""

from __future__ import annotations

import torch

from .._native import core
from .._options import llsa_config
from ..grid import TokenGrid
from . import llsa_plan
from .block_attention import _desc


def _layout(num_tokens: int, block_size: int, topks: list[int]) -> llsa_plan.Layout:
    return llsa_plan.Layout(num_tokens, block_size, tuple(topks))


@torch.library.custom_op("difattn::llsa_fwd", mutates_args=())
def llsa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, plan: list[torch.Tensor],
    block_size: int, topks: list[int], scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel == "triton":
        from ..triton_kernels import llsa as tk

        return tk.llsa_fwd(q, k, v, kp, vp, plan, block_size, scale)
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().llsa_forward(
        _desc(q), _desc(k), _desc(v), _desc(kp), _desc(vp), _desc(out), _desc(lse), _plan_args(plan), block_size,
        scale, torch.get_num_threads(),
    )
    return out, lse


@llsa_fwd.register_fake
def _(q, k, v, kp, vp, plan, block_size, topks, scale, kernel):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


def _plan_args(plan: list[torch.Tensor]):
    return tuple(_desc(t.contiguous()) for t in plan)


@torch.library.custom_op("difattn::llsa_bwd", mutates_args=())
def llsa_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, out: torch.Tensor,
    dout: torch.Tensor, lse: torch.Tensor, plan: list[torch.Tensor], block_size: int, topks: list[int], scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = (dout.float() * out.float()).sum(-1)
    if kernel == "triton":
        return _triton_bwd(q, k, v, kp, vp, dout, lse, delta, plan, _layout(q.shape[2], block_size, topks), scale)
    dq, dk, dv, dkp, dvp = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v, kp, vp))
    core().llsa_backward(
        _desc(q), _desc(k), _desc(v), _desc(kp), _desc(vp), _desc(dout), _desc(lse), _desc(delta),
        _desc(dq), _desc(dk), _desc(dv), _desc(dkp), _desc(dvp), _plan_args(plan), block_size, scale,
        torch.get_num_threads(),
    )
    return dq, dk, dv, dkp, dvp


@llsa_bwd.register_fake
def _(q, k, v, kp, vp, out, dout, lse, plan, block_size, topks, scale, kernel):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v, kp, vp))


def _triton_bwd(q, k, v, kp, vp, dout, lse, delta, plan, layout: llsa_plan.Layout, scale: float):
    """The Triton key side needs the transposed fine selection and the pooled items; the items' partial gradients
    are summed per pooled token here (torch ``index_add_``)."""
    from ..triton_kernels import llsa as tk

    fine, pooled = plan[0], plan[1]
    t_indptr, t_indices = llsa_plan.transpose(fine, layout.num_blocks)
    ranges, blocks = llsa_plan.pooled_items(pooled, layout)
    dq, dk, dv, part_k, part_v = tk.llsa_bwd(
        q, k, v, kp, vp, dout, lse, delta, plan, (t_indptr, t_indices, ranges, blocks), layout.block_size, scale,
    )
    offsets = plan[2].long()
    B, H, P = kp.shape[:3]
    b = layout.block_size
    rows = offsets[blocks.long()][..., None] + torch.arange(b, device=q.device)  # (B*H, I, b) pooled rows
    ends = offsets[blocks.long() + 1][..., None]
    valid = rows < ends
    target = (torch.arange(B * H, device=q.device)[:, None, None] * P + rows)[valid]
    dkp = torch.zeros(B * H * P, kp.shape[3], dtype=torch.float32, device=q.device)
    dvp = torch.zeros(B * H * P, vp.shape[3], dtype=torch.float32, device=q.device)
    dkp.index_add_(0, target, part_k[valid])
    dvp.index_add_(0, target, part_v[valid])
    return dq, dk, dv, dkp.view(kp.shape).to(kp.dtype), dvp.view(vp.shape).to(vp.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, plan, block_size, topks, scale, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, out, lse, *plan)
    ctx.options = (block_size, topks, scale, kernel)


def _backward(ctx, dout, dlse):
    q, k, v, kp, vp, out, lse, *plan = ctx.saved_tensors
    block_size, topks, scale, kernel = ctx.options
    grads = llsa_bwd(q, k, v, kp, vp, out, dout.contiguous(), lse, plan, block_size, topks, scale, kernel)
    return (*grads, [None] * len(plan), None, None, None, None)


llsa_fwd.register_autograd(_backward, setup_context=_setup_context)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: list[torch.Tensor], layout: llsa_plan.Layout,
           *, scale: float, kernel: str) -> torch.Tensor:
    """LLSA attention over a given selection ``[I_1, ..., I_L]`` (internal token order). Returns ``(B, H, N, Dv)``."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the {kernel} LLSA kernels take float32, float16 or bfloat16, got {q.dtype} "
                        "(use backend='torch' for float64)")
    kp, vp = llsa_plan.pooled(k, layout), llsa_plan.pooled(v, layout)
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, q.device)
    out, _ = llsa_fwd(q, k, v, kp, vp, [fine, pooled, offsets, bias], layout.block_size, list(layout.topks),
                      float(scale), kernel)
    return out


def llsa_attention(q, k, v, *, block_size, topk, levels, grid: TokenGrid | None, return_indices: bool, scale,
                   kernel: str):
    """Same contract as :func:`difattn.llsa_attention` (arguments validated) on the ``kernel`` kernels.

    With a grid, q, k, v are gathered into Z-order (text at its end), attended, and the output restored to the
    caller's order; ``return_indices`` gives ``[I_1, ..., I_L]`` in the Z-ordered numbering."""
    num_tokens = q.shape[2]
    _, topks = llsa_config(num_tokens, block_size, topk, levels)
    layout = llsa_plan.Layout(num_tokens, block_size, topks)
    inverse = None
    if grid is not None:
        from ..plans import zorder

        perm, inverse = zorder(grid, q.device)
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    indices = llsa_plan.select(q, k, layout)
    out = attend(q, k, v, indices, layout, scale=scale, kernel=kernel)
    if inverse is not None:
        out = out[:, :, inverse]
    return (out, indices) if return_indices else out
