"""The block engine's Rust CPU launchers: allocate the outputs and run ``difattn._core``'s kernels (the GIL is
released while they run, on ``torch.get_num_threads()`` workers)."""

from __future__ import annotations

import torch

from ..._native import core
from .._base.descriptors import optional_desc, tensor_desc
from .plan import BlockPlan


def _plan_descs(plan: BlockPlan) -> tuple:
    return tuple(tensor_desc(t) for t in (plan.q_perm, plan.q_offsets, plan.k_perm, plan.k_offsets, plan.indptr,
                                          plan.indices, plan.kinds, plan.q_coords, plan.k_coords))


def forward(q, k, v, plan: BlockPlan, key_valid, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().block_attention_forward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(out), tensor_desc(lse), _plan_descs(plan),
        optional_desc(key_valid), plan.max_d2, plan.max_dt, scale, torch.get_num_threads(),
    )
    return out, lse


def backward(q, k, v, out, dout, lse, plan: BlockPlan, key_valid, scale: float):
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    core().block_attention_backward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(dout), tensor_desc(lse), tensor_desc(delta),
        tensor_desc(dq), tensor_desc(dk), tensor_desc(dv), _plan_descs(plan), optional_desc(key_valid),
        plan.max_d2, plan.max_dt, scale, torch.get_num_threads(),
    )
    return dq, dk, dv
