"""LLSA as custom ops: ``difattn::llsa_fwd`` / ``difattn::llsa_bwd`` over a selection, and the method on them.

``kernel="rust"`` runs the Rust CPU kernels, ``kernel="triton"`` the Triton kernels (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). The ops take the fine ``q, k, v`` (any strides), the pooled keys and values of every level
``kp, vp`` (``(B, H, P, ·)``, computed from k and v without autograd: the op owns their backward) and the plan
``[fine, pooled, pb_offsets, pbias]`` of :mod:`.llsa_plan`; the Rust kernels also take ``[..., rows]``, an int64
permutation: internal position ``r`` is row ``rows[r]`` of q, k, v, the output and the gradients (the Z-order without
a gathered copy). The forward returns the output (q's dtype) and the
log-sum-exp (fp32); the backward returns dq, and dk, dv through both the fine keys and the pooled ones (the mean-pool
backward: each fine token gets its level-l ancestor's gradient over that ancestor's count, at every level).
"""

from __future__ import annotations

import torch

from .._native import core
from .._options import llsa_config, llsa_level_sizes
from ..grid import TokenGrid
from ..plans import zorder
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
        _desc(q), _desc(k), _desc(v), _desc(kp), _desc(vp), _desc(out), _desc(lse), *_plan_args(plan), block_size,
        len(topks), scale, torch.get_num_threads(),
    )
    return out, lse


@llsa_fwd.register_fake
def _(q, k, v, kp, vp, plan, block_size, topks, scale, kernel):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


def _plan_args(plan: list[torch.Tensor]):
    """Descriptors of the plan tensors (contiguous already: a temporary copy would die before the kernel runs):
    ``(fine, pooled, pb_offsets, pbias)`` and ``rows`` (``None`` without)."""
    if len(plan) not in (4, 5) or not all(t.is_contiguous() for t in plan):
        raise ValueError("plan: 4 or 5 contiguous tensors")
    return tuple(_desc(t) for t in plan[:4]), (_desc(plan[4]) if len(plan) == 5 else None)


@torch.library.custom_op("difattn::llsa_bwd", mutates_args=())
def llsa_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, out: torch.Tensor,
    dout: torch.Tensor, lse: torch.Tensor, plan: list[torch.Tensor], block_size: int, topks: list[int], scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernel == "triton":
        delta = (dout.float() * out.float()).sum(-1)
        return _triton_bwd(q, k, v, kp, vp, dout, lse, delta, plan, _layout(q.shape[2], block_size, topks), scale)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    core().llsa_backward(  # computes delta = rowsum(dout * out) itself
        _desc(q), _desc(k), _desc(v), _desc(kp), _desc(vp), _desc(dout), _desc(out), _desc(lse),
        _desc(dq), _desc(dk), _desc(dv), *_plan_args(plan), block_size, len(topks), scale, torch.get_num_threads(),
    )
    return dq, dk, dv


@llsa_bwd.register_fake
def _(q, k, v, kp, vp, out, dout, lse, plan, block_size, topks, scale, kernel):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _triton_bwd(q, k, v, kp, vp, dout, lse, delta, plan, layout: llsa_plan.Layout, scale: float):
    """The Triton key side needs the transposed fine selection and the pooled items. The items' partial gradients
    are summed per pooled token (``index_add_``), spread back to the fine tokens and added to the fine gradients."""
    from ..triton_kernels import llsa as tk

    fine, pooled = plan[0], plan[1]
    t_indptr, t_indices = llsa_plan.transpose(fine, layout.num_blocks)
    ranges, blocks = llsa_plan.pooled_items(pooled, layout)
    dq, dk, dv, part_k, part_v = tk.llsa_bwd(
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


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, plan, block_size, topks, scale, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, out, lse, *plan)
    ctx.options = (block_size, topks, scale, kernel)


def _backward(ctx, dout, dlse):
    q, k, v, kp, vp, out, lse, *plan = ctx.saved_tensors
    block_size, topks, scale, kernel = ctx.options
    dq, dk, dv = llsa_bwd(q, k, v, kp, vp, out, dout.contiguous(), lse, plan, block_size, topks, scale, kernel)
    return dq, dk, dv, None, None, [None] * len(plan), None, None, None, None


llsa_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("difattn::llsa_zorder", mutates_args=())
def llsa_zorder(frames: int, height: int, width: int, text_tokens: int, text_position: str,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` of the grid's Z-order (the cached Rust plan), as an op so ``torch.compile`` keeps it in
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
    same ranks as :func:`.llsa_plan.select` (descending score, ties to the lower id)."""
    indices = [torch.empty(*x.shape[:3], kk, dtype=torch.int64) for x, kk in zip(queries, topks)]
    core().llsa_select([_desc(x) for x in queries], [_desc(x) for x in keys], [_desc(x) for x in indices],
                       block_size, torch.get_num_threads())
    return indices


@llsa_select_cpu.register_fake
def _(queries, keys, block_size, topks):
    return [x.new_empty(*x.shape[:3], kk, dtype=torch.int64) for x, kk in zip(queries, topks)]


def select(queries: list[torch.Tensor], keys: list[torch.Tensor], layout: llsa_plan.Layout,
           kernel: str) -> list[torch.Tensor]:
    """The selection on the tensors' device: Rust for float32 pyramids on CPU, torch ops otherwise."""
    if kernel == "rust" and queries[0].device.type == "cpu" and queries[0].dtype == torch.float32:
        return llsa_select_cpu([x.detach() for x in queries], [x.detach() for x in keys], layout.block_size,
                               list(layout.topks))
    return llsa_plan.select(queries, keys, layout)


@torch.library.custom_op("difattn::llsa_zorder_pool", mutates_args=())
def llsa_zorder_pool(x: torch.Tensor, perm: torch.Tensor, block_size: int, levels: int) -> torch.Tensor:
    """The pyramid of ``x[:, :, perm]`` (levels ``1..levels``, ``levels >= 1``) as ``(B, H, P, C)`` float32, in one
    Rust pass over a CPU tensor that reads the rows in place (not differentiated: pass ``x`` detached)."""
    B, H, N, C = x.shape
    pooled = torch.empty(B, H, sum(llsa_level_sizes(N, block_size, levels)[1:]), C, dtype=torch.float32)
    core().llsa_zorder_pool(_desc(x), _desc(perm), _desc(pooled), block_size, levels, torch.get_num_threads())
    return pooled


@llsa_zorder_pool.register_fake
def _(x, perm, block_size, levels):
    B, H, N, C = x.shape
    return x.new_empty(B, H, sum(llsa_level_sizes(N, block_size, levels)[1:]), C, dtype=torch.float32)


def _gather_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[:, :, perm]`` as a contiguous ``(B, H, N, C)`` tensor. Row gathers over a 2-D view of the storage are about
    twice as fast as ``index_select`` on dim 2: used for ``(B, H, N, C)`` and token-major ``(B, N, H, C)`` storage."""
    B, H, N, C = x.shape
    b, h = torch.arange(B, device=x.device)[:, None, None], torch.arange(H, device=x.device)[None, :, None]
    if x.is_contiguous():
        rows, flat = (b * H + h) * N + perm, x.view(B * H * N, C)
    elif x.transpose(1, 2).is_contiguous():
        rows, flat = (b * N + perm) * H + h, x.transpose(1, 2).view(B * N * H, C)
    else:
        return x.index_select(2, perm)
    return flat.index_select(0, rows.reshape(-1)).view(B, H, N, C)


class _Permute(torch.autograd.Function):
    """``x[:, :, perm]`` for a permutation: the backward gathers by the inverse (no zero fill, no scatter-add)."""

    @staticmethod
    def forward(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return _gather_tokens(x, perm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_tokens(grad, inverse), None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: list[torch.Tensor], layout: llsa_plan.Layout,
           *, scale: float, kernel: str, key_levels: list[torch.Tensor] | None = None,
           pooled_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """LLSA attention over a given selection ``[I_1, ..., I_L]`` (internal token order); ``key_levels``: k's pyramid
    when the caller has it; ``pooled_kv``: the concatenated float32 pyramids ``(B, H, P, ·)`` of k and v when the
    caller has them; ``rows`` (Rust kernels): internal position ``r`` is row ``rows[r]`` of q, k, v and the output.
    Returns ``(B, H, N, Dv)``."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the {kernel} LLSA kernels take float32, float16 or bfloat16, got {q.dtype} "
                        "(use backend='torch' for float64)")
    with torch.no_grad():  # the op differentiates through the pooling itself
        if pooled_kv is not None:
            kp, vp = pooled_kv[0].to(k.dtype), pooled_kv[1].to(v.dtype)
        else:
            if key_levels is None:
                key_levels = llsa_plan.pyramid(k, layout.block_size, layout.levels)
            kp = llsa_plan.pooled(key_levels, k.dtype)
            vp = llsa_plan.pooled(llsa_plan.pyramid(v, layout.block_size, layout.levels), v.dtype)
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, q.device)
    plan = [fine, pooled, offsets, bias] + ([] if rows is None else [rows])
    out, _ = llsa_fwd(q, k, v, kp, vp, plan, layout.block_size, list(layout.topks), float(scale), kernel)
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
        perm, inverse = llsa_zorder(grid.frames, grid.height, grid.width, grid.text_tokens, grid.text_position,
                                    q.device)
    if grid is not None and _rust_prep(kernel, q, k, v):
        # One Rust pass per tensor pools it in Z-order; the kernels read q, k, v and write the output through the
        # permutation, so nothing is gathered into a Z-ordered copy nor scattered back (no torch passes either).
        qp, kp, vp = (llsa_zorder_pool(x.detach(), perm, block_size, layout.levels) for x in (q, k, v))
        bounds = [layout.token_offset(lv) for lv in range(1, layout.levels + 2)]
        query_levels, key_levels = ([p[:, :, a:b] for a, b in zip(bounds, bounds[1:])] for p in (qp, kp))
        indices = select(query_levels, key_levels, layout, kernel)
        out = attend(q, k, v, indices, layout, scale=scale, kernel=kernel, pooled_kv=(kp, vp), rows=perm)
        return (out, indices) if return_indices else out
    if grid is not None:
        q, k, v = (_Permute.apply(x, perm, inverse) for x in (q, k, v))
    with torch.no_grad():
        key_levels = llsa_plan.pyramid(k, block_size, layout.levels)
        indices = select(llsa_plan.pyramid(q, block_size, layout.levels), key_levels, layout, kernel)
    out = attend(q, k, v, indices, layout, scale=scale, kernel=kernel, key_levels=key_levels)
    if inverse is not None:
        out = _Permute.apply(out, inverse, perm)
    return (out, indices) if return_indices else out


def _rust_prep(kernel: str, *xs: torch.Tensor) -> bool:
    """Whether the Rust gather-and-pool pass can prepare these tensors (CPU, the Rust kernels' float dtypes)."""
    return kernel == "rust" and all(x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                    for x in xs)
