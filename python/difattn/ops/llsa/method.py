"""LLSA on the fast backends (arguments validated and options resolved by :func:`difattn.llsa_attention`).

With a grid, image tokens are attended in per-frame Z-order (text stays at its end of the sequence) and the output
comes back in the caller's order. The selection runs on the tensors' device: the Rust core on the rust backend,
torch ops on the triton backend (ties go to the lower id either way, as in the reference).
"""

from __future__ import annotations

import torch

from ...grid import TokenGrid
from .._base.registry import launcher, register
from . import plan as llsa_plan
from .op import llsa_fwd, llsa_select_cpu, llsa_zorder, llsa_zorder_pool


@register("llsa_select", "rust")
def _select_rust(queries: list[torch.Tensor], keys: list[torch.Tensor], layout: llsa_plan.Layout) -> list[torch.Tensor]:
    return llsa_select_cpu([x.detach() for x in queries], [x.detach() for x in keys], layout.block_size,
                           list(layout.topks))


register("llsa_select", "triton")(llsa_plan.select)


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
           *, scale: float, backend: str, key_levels: list[torch.Tensor] | None = None,
           pooled_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """LLSA attention over a given selection ``[I_1, ..., I_L]`` (internal token order); ``key_levels``: k's pyramid
    when the caller has it; ``pooled_kv``: the concatenated float32 pyramids ``(B, H, P, ·)`` of k and v when the
    caller has them; ``rows`` (Rust kernels): internal position ``r`` is row ``rows[r]`` of q, k, v and the output.
    Returns ``(B, H, N, Dv)``."""
    with torch.no_grad():  # the op differentiates through the pooling itself
        if pooled_kv is not None:
            kp, vp = pooled_kv[0].to(k.dtype), pooled_kv[1].to(v.dtype)
        else:
            if key_levels is None:
                key_levels = llsa_plan.pyramid(k, layout.block_size, layout.levels, layout.children)
            kp = llsa_plan.pooled(key_levels, k.dtype)
            vp = llsa_plan.pooled(llsa_plan.pyramid(v, layout.block_size, layout.levels, layout.children), v.dtype)
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, q.device)
    plan = [fine, pooled, offsets, bias] + ([] if rows is None else [rows])
    out, _ = llsa_fwd(q, k, v, kp, vp, plan, layout.block_size, list(layout.topks), layout.children, float(scale),
                      backend)
    return out


def llsa_on_kernels(q, k, v, *, block_size: int, topk: tuple[int, ...], levels: int, grid: TokenGrid | None,
                    return_indices: bool, scale: float, backend: str, coarse_pooling: str = "children",
                    token_weight: tuple[float, ...] | None = None, indices: list[torch.Tensor] | None = None):
    """LLSA on ``backend``'s kernels with the pyramids made by torch ops (q, k, v gathered into Z-order with a grid).
    ``topk`` holds one top-K per level (``levels`` of them), ``token_weight`` one weight per level or None (resolved);
    ``indices``: a validated selection to use instead of the routing. Returns ``(B, H, N, Dv)``, plus
    ``[I_1, ..., I_L]`` (Z-ordered numbering) with ``return_indices``."""
    layout = llsa_plan.Layout(q.shape[2], block_size, topk, coarse_pooling == "children", token_weight)
    assert layout.levels == levels, "topk must hold one top-K per level"
    inverse = None
    if grid is not None:
        perm, inverse = llsa_zorder(*grid.core_args(), q.device)
        q, k, v = (_Permute.apply(x, perm, inverse) for x in (q, k, v))
    with torch.no_grad():
        key_levels = llsa_plan.pyramid(k, block_size, layout.levels, layout.children)
        if indices is None:
            queries = llsa_plan.pyramid(q, block_size, layout.levels, layout.children)
            indices = launcher("llsa_select", backend)(queries, key_levels, layout)
    out = attend(q, k, v, indices, layout, scale=scale, backend=backend, key_levels=key_levels)
    if inverse is not None:
        out = _Permute.apply(out, inverse, perm)
    return (out, indices) if return_indices else out


def llsa_on_cpu(q, k, v, *, block_size: int, topk: tuple[int, ...], levels: int, grid: TokenGrid | None,
                return_indices: bool, scale: float, coarse_pooling: str = "children",
                token_weight: tuple[float, ...] | None = None, indices: list[torch.Tensor] | None = None):
    """LLSA on the Rust kernels. With a grid, one Rust pass per tensor pools it in Z-order, and the kernels read
    q, k, v and write the output through the permutation: nothing is gathered into a Z-ordered copy nor scattered
    back. Returns as :func:`llsa_on_kernels`."""
    options = dict(block_size=block_size, topk=topk, levels=levels, return_indices=return_indices, scale=scale,
                   coarse_pooling=coarse_pooling, token_weight=token_weight, indices=indices)
    if grid is None:
        return llsa_on_kernels(q, k, v, grid=None, backend="rust", **options)
    layout = llsa_plan.Layout(q.shape[2], block_size, topk, coarse_pooling == "children", token_weight)
    perm, _ = llsa_zorder(*grid.core_args(), q.device)
    kp, vp = (llsa_zorder_pool(x.detach(), perm, block_size, layout.levels, layout.children) for x in (k, v))
    if indices is None:
        qp = llsa_zorder_pool(q.detach(), perm, block_size, layout.levels, layout.children)
        bounds = [layout.token_offset(lv) for lv in range(1, layout.levels + 2)]
        query_levels, key_levels = ([p[:, :, a:b] for a, b in zip(bounds, bounds[1:])] for p in (qp, kp))
        indices = _select_rust(query_levels, key_levels, layout)
    out = attend(q, k, v, indices, layout, scale=scale, backend="rust", pooled_kv=(kp, vp), rows=perm)
    return (out, indices) if return_indices else out
