"""LLSA's Rust CPU launchers (the same signatures as :mod:`.triton_launch`)."""

from __future__ import annotations

import torch

from ..._native import core
from .._base.descriptors import tensor_desc


def _plan_args(plan: list[torch.Tensor]):
    """Descriptors of the plan tensors (contiguous already: a temporary copy would die before the kernel runs):
    ``(fine, pooled, pb_offsets, pbias)`` and ``rows`` (``None`` without)."""
    if len(plan) not in (4, 5) or not all(t.is_contiguous() for t in plan):
        raise ValueError("plan: 4 or 5 contiguous tensors")
    return tuple(tensor_desc(t) for t in plan[:4]), (tensor_desc(plan[4]) if len(plan) == 5 else None)


def forward(q, k, v, kp, vp, plan, block_size: int, topks: list[int], scale: float):
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().llsa_forward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(kp), tensor_desc(vp), tensor_desc(out),
        tensor_desc(lse), *_plan_args(plan), block_size, len(topks), scale, torch.get_num_threads(),
    )
    return out, lse


def backward(q, k, v, kp, vp, out, dout, lse, plan, block_size: int, topks: list[int], children: bool, scale: float):
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    core().llsa_backward(  # computes delta = rowsum(dout * out) itself
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(kp), tensor_desc(vp), tensor_desc(dout),
        tensor_desc(out), tensor_desc(lse), tensor_desc(dq), tensor_desc(dk), tensor_desc(dv), *_plan_args(plan),
        block_size, len(topks), children, scale, torch.get_num_threads(),
    )
    return dq, dk, dv
