"""LLSA's custom ops: the attention kernels ``difattn::llsa_fwd`` / ``difattn::llsa_bwd`` over a selection, and
the CPU plan ops ``difattn::llsa_zorder``, ``difattn::llsa_select_cpu``, ``difattn::llsa_zorder_pool``.

The attention ops take the fine ``q, k, v`` (any strides), the pooled keys and values of every level ``kp, vp``
(``(B, H, P, ·)``, computed from k and v without autograd: the op owns their backward) and the plan ``[fine,
pooled, pb_offsets, pbias]`` of :mod:`.plan`; the Rust kernels also take ``[..., rows]``, an int64 permutation:
internal position ``r`` is row ``rows[r]`` of q, k, v, the output and the gradients (the Z-order without a gathered
copy). The forward returns the output (q's dtype) and the log-sum-exp (fp32); the backward returns dq, and dk, dv
through both the fine keys and the pooled ones (the mean-pool backward of the pooling rule ``children``: each
level-(l−1) token gets its parent's gradient over the parent's number of children, level by level; otherwise each
fine token gets its level-l ancestor's gradient over that ancestor's count, at every level).
"""

from __future__ import annotations

import torch

from ..._native import core
from ..._options import llsa_level_sizes
from ...grid import TokenGrid
from .._base.descriptors import tensor_desc
from .._base.orders import zorder
from .._base.registry import launcher, register_lazy

for _backend in ("rust", "triton"):
    register_lazy("llsa_fwd", _backend, f"{__package__}.{_backend}_launch", "forward")
    register_lazy("llsa_bwd", _backend, f"{__package__}.{_backend}_launch", "backward")


@torch.library.custom_op("difattn::llsa_fwd", mutates_args=())
def llsa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, plan: list[torch.Tensor],
    block_size: int, topks: list[int], children: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return launcher("llsa_fwd", backend)(q, k, v, kp, vp, plan, block_size, topks, scale)


@llsa_fwd.register_fake
def _(q, k, v, kp, vp, plan, block_size, topks, children, scale, backend):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("difattn::llsa_bwd", mutates_args=())
def llsa_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, out: torch.Tensor,
    dout: torch.Tensor, lse: torch.Tensor, plan: list[torch.Tensor], block_size: int, topks: list[int], children: bool,
    scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launcher("llsa_bwd", backend)(q, k, v, kp, vp, out, dout, lse, plan, block_size, topks, children, scale)


@llsa_bwd.register_fake
def _(q, k, v, kp, vp, out, dout, lse, plan, block_size, topks, children, scale, backend):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, plan, block_size, topks, children, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, out, lse, *plan)
    ctx.options = (block_size, topks, children, scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, kp, vp, out, lse, *plan = ctx.saved_tensors
    dq, dk, dv = llsa_bwd(q, k, v, kp, vp, out, dout.contiguous(), lse, plan, *ctx.options)
    return dq, dk, dv, None, None, [None] * len(plan), None, None, None, None, None


llsa_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("difattn::llsa_zorder", mutates_args=())
def llsa_zorder(frames: int, height: int, width: int, text_tokens: int, text_position: str,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` of the grid's Z-order (the cached Rust order), as an op so ``torch.compile`` keeps it in
    the graph instead of tracing into the compiled core."""
    perm, inverse = zorder(TokenGrid(height, width, frames, text_tokens, text_position), device)
    return perm.clone(), inverse.clone()


@llsa_zorder.register_fake
def _(frames, height, width, text_tokens, text_position, device):
    n = frames * height * width + text_tokens
    return torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, dtype=torch.int64, device=device)


@torch.library.custom_op("difattn::llsa_select_cpu", mutates_args=())
def llsa_select_cpu(queries: list[torch.Tensor], keys: list[torch.Tensor], block_size: int,
                    topks: list[int]) -> list[torch.Tensor]:
    """``[I_1, ..., I_L]`` from the float32 pyramids of q and k (finest level first), by the Rust selection: the
    same ranks as :func:`.plan.select` (descending score, ties to the lower id)."""
    indices = [torch.empty(*x.shape[:3], kk, dtype=torch.int64) for x, kk in zip(queries, topks)]
    core().llsa_select([tensor_desc(x) for x in queries], [tensor_desc(x) for x in keys],
                       [tensor_desc(x) for x in indices], block_size, torch.get_num_threads())
    return indices


@llsa_select_cpu.register_fake
def _(queries, keys, block_size, topks):
    return [x.new_empty(*x.shape[:3], kk, dtype=torch.int64) for x, kk in zip(queries, topks)]


@torch.library.custom_op("difattn::llsa_zorder_pool", mutates_args=())
def llsa_zorder_pool(x: torch.Tensor, perm: torch.Tensor, block_size: int, levels: int, children: bool) -> torch.Tensor:
    """The pyramid of ``x[:, :, perm]`` (levels ``1..levels``, ``levels >= 1``; ``children``: each token the mean of
    its children, else of the fine tokens under it) as ``(B, H, P, C)`` float32, in one Rust pass over a CPU tensor
    that reads the rows in place (not differentiated: pass ``x`` detached)."""
    B, H, N, C = x.shape
    pooled = torch.empty(B, H, sum(llsa_level_sizes(N, block_size, levels)[1:]), C, dtype=torch.float32)
    core().llsa_zorder_pool(tensor_desc(x), tensor_desc(perm), tensor_desc(pooled), block_size, levels, children,
                            torch.get_num_threads())
    return pooled


@llsa_zorder_pool.register_fake
def _(x, perm, block_size, levels, children):
    B, H, N, C = x.shape
    return x.new_empty(B, H, sum(llsa_level_sizes(N, block_size, levels)[1:]), C, dtype=torch.float32)
