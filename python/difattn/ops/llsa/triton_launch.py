"""LLSA's Triton launchers (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); imported only when the
triton backend runs."""

from __future__ import annotations

import torch

from ...triton_kernels import llsa as kernels
from . import plan as llsa_plan


def forward(q, k, v, kp, vp, plan, block_size: int, topks: list[int], scale: float):
    return kernels.llsa_fwd(q, k, v, kp, vp, plan, block_size, scale)


def backward(q, k, v, kp, vp, out, dout, lse, plan, block_size: int, topks: list[int], children: bool, scale: float):
    """The key side needs the transposed fine selection and the pooled items. The items' partial gradients are
    summed per pooled token (``index_add_``), spread back to the fine tokens (the pooling rule's mean-pool backward)
    and added to the fine gradients."""
    layout = llsa_plan.Layout(q.shape[2], block_size, tuple(topks), children)
    delta = (dout.float() * out.float()).sum(-1)
    fine, pooled = plan[0], plan[1]
    t_indptr, t_indices = llsa_plan.transpose(fine, layout.num_blocks)
    ranges, blocks = llsa_plan.pooled_items(pooled, layout)
    dq, dk, dv, part_k, part_v = kernels.llsa_bwd(
        q, k, v, kp, vp, dout, lse, delta, plan, (t_indptr, t_indices, ranges, blocks), layout.block_size, scale,
    )
    offsets = plan[2].long()
    B, H, P = kp.shape[:3]
    rows = offsets[blocks.long()][..., None] + torch.arange(layout.block_size, device=q.device)  # (B*H, I, b)
    valid = rows < offsets[blocks.long() + 1][..., None]
    target = (torch.arange(B * H, device=q.device)[:, None, None] * P + rows)[valid]
    dkp = torch.zeros(B * H * P, kp.shape[3], dtype=torch.float32, device=q.device).index_add_(0, target, part_k[valid])
    dvp = torch.zeros(B * H * P, vp.shape[3], dtype=torch.float32, device=q.device).index_add_(0, target, part_v[valid])
    dk = dk + llsa_plan.unpool(dkp.view(B, H, P, -1), layout)
    dv = dv + llsa_plan.unpool(dvp.view(B, H, P, -1), layout)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
