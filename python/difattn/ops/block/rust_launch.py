"""The block engine's Rust CPU launchers: allocate the outputs and run ``difattn._core``'s kernels over the core's
own plan object (the GIL is released while they run, on ``torch.get_num_threads()`` workers)."""

from __future__ import annotations

import torch

from ..._native import core
from .._base.descriptors import optional_desc, tensor_desc
from .plan import BlockPlan


def forward(q, k, v, plan: BlockPlan, key_valid, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().block_attention_forward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(out), tensor_desc(lse), plan.native,
        optional_desc(key_valid), scale, torch.get_num_threads(),
    )
    return out, lse


def backward(q, k, v, out, dout, lse, plan: BlockPlan, key_valid, scale: float):
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    core().block_attention_backward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), tensor_desc(dout), tensor_desc(lse), tensor_desc(delta),
        tensor_desc(dq), tensor_desc(dk), tensor_desc(dv), plan.native, optional_desc(key_valid), scale,
        torch.get_num_threads(),
    )
    return dq, dk, dv
