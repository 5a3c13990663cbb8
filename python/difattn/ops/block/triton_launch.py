"""The block engine's Triton launchers (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); imported only
when the triton backend runs."""

from __future__ import annotations

from ...triton_kernels import block_attention as kernels
from .plan import BlockPlan


def forward(q, k, v, plan: BlockPlan, key_valid, scale: float):
    return kernels.block_attention_fwd(q, k, v, plan.tensors(), key_valid, plan.disc_bits, plan.max_blocks, scale)


def backward(q, k, v, out, dout, lse, plan: BlockPlan, key_valid, scale: float):
    return kernels.block_attention_bwd(q, k, v, out, dout, lse, plan.tensors(), key_valid, plan.disc_bits,
                                       plan.max_blocks, scale)
