"""PISA's Rust CPU launchers (same signatures as the Triton launchers in ``difattn.triton_kernels.pisa``)."""

from __future__ import annotations

import torch

from ..._native import core
from .._base.descriptors import optional_desc, tensor_desc


def _plan(perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plan's int64 tensors as the core reads them (contiguous, blocks flat). The caller keeps them until the
    core returns: a descriptor holds no reference, and a contiguous copy would otherwise be freed before the read."""
    return perm.contiguous(), offsets.contiguous(), blocks.contiguous().view(-1)


def forward(q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, scale: float, max_block: int):
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    zeta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    plan = _plan(perm, offsets, blocks)
    core().pisa_forward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), (tensor_desc(key_mean), tensor_desc(value_mean)),
        optional_desc(moment_mean), tensor_desc(out), tensor_desc(lse), tensor_desc(zeta), tuple(map(tensor_desc, plan)),
        scale, torch.get_num_threads(),
    )
    return out, lse, zeta


def backward(q, k, v, key_mean, value_mean, moment_mean, out, dout, lse, zeta, perm, offsets, blocks, scale: float,
             max_block: int):
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    dkm, dvm = (torch.empty(x.shape, dtype=torch.float32, device=q.device) for x in (key_mean, value_mean))
    dhm = torch.empty(moment_mean.shape if moment_mean is not None else (0,), dtype=torch.float32, device=q.device)
    plan = _plan(perm, offsets, blocks)
    core().pisa_backward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), (tensor_desc(key_mean), tensor_desc(value_mean)),
        optional_desc(moment_mean), (tensor_desc(out), tensor_desc(dout), tensor_desc(lse), tensor_desc(zeta)),
        (tensor_desc(dq), tensor_desc(dk), tensor_desc(dv)), (tensor_desc(dkm), tensor_desc(dvm)),
        None if moment_mean is None else tensor_desc(dhm), tuple(map(tensor_desc, plan)), scale, torch.get_num_threads(),
    )
    return dq, dk, dv, dkm, dvm, dhm
