"""PISA on the Rust (CPU) and Triton kernels (``specs/pisa.md``): block statistics (``difattn::pisa_stats``),
routing in torch, then one fused kernel for the exact blocks, the centroids and the first-order term, as the custom
ops ``difattn::pisa_fwd`` / ``difattn::pisa_bwd``.

Pipeline for ``(B, H, N, D)`` inputs over M blocks (:mod:`.pisa_layout`):

1. Statistics (:mod:`.pisa_stats`, differentiable): ``k̄_j``, ``w_j = V̂_j / n_j`` and, for the hybrid order,
   ``H̄`` by reduction; plus ``q̄_j`` and the routing bias's ``‖H_j − H̄‖_F`` (not differentiated).
2. Routing: ``score = s q̄ k̄ᵀ (+ ln(‖H_j − H̄‖_F + 1e-5))``, the sink forced in, a stable descending sort, the first
   ``k = max(1, floor(density · M))``.
3. The kernel: ``out, lse, zeta = pisa_fwd(q, k, v, k̄, w, H̄, ...)`` with ``out = (acc + s z q·H̄) / den``. Its
   backward returns the gradients of q, k, v (exact entries), k̄, w and H̄; autograd carries the last three through
   step 1 to every token of their blocks.

The selection ``blocks (B, H, M, k)`` uses the reference's block numbering (:func:`difattn.reference.pisa.pisa_layout`).
"""

from __future__ import annotations

import torch

from .. import reference
from .._native import core
from ..grid import TokenGrid
from .block_attention import _desc
from .pisa_layout import pisa_layout
from .pisa_stats import block_stats, route


def _num_selected(density: float, num_blocks) -> int:
    """:func:`difattn._options.pisa_num_selected` (``max(1, floor(density · M))``) written so that a symbolic block
    count (``torch.compile`` with dynamic shapes) traces: ``sym_int`` truncates, the floor of a positive product."""
    return torch.sym_max(1, torch.sym_int(density * num_blocks))


def _check_blocks(blocks: object, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.int64:
        raise TypeError(f"blocks must be an int64 torch.Tensor of shape (B, H, M, k) = {shape}, got {blocks!r:.80}")
    if tuple(blocks.shape) != shape or blocks.device != device:
        raise ValueError(f"blocks must have shape (B, H, M, k) = {shape} on {device}, got {tuple(blocks.shape)} "
                         f"on {blocks.device}")
    ascending = blocks.sort(dim=-1).values
    if bool((ascending[..., 0] < 0).any() | (ascending[..., -1] >= shape[2]).any()):
        raise ValueError(f"blocks must hold block ids in [0, {shape[2]})")
    if bool((ascending[..., 1:] == ascending[..., :-1]).any()):
        raise ValueError("blocks must not repeat a block id within a query block's selection")
    return blocks.contiguous()


def pisa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, density: float, block_size: int, order: str,
    routing_bias: bool, sink: str | None, grid: TokenGrid | None, return_blocks: bool, scale: float, kernel: str,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`difattn.pisa_attention` (arguments validated) on the ``kernel`` (``"rust"`` or
    ``"triton"``) kernels; ``blocks`` as in :func:`difattn.reference.pisa_attention` (a given selection).

    ``order="first"`` (memory-bound per-block moments) and float64 inputs run the torch reference: the kernels
    implement the zeroth and hybrid orders in fp32/fp16/bf16.
    """
    if order == "first" or q.dtype == torch.float64:
        return reference.pisa_attention(
            q, k, v, density=density, block_size=block_size, order=order, routing_bias=routing_bias, sink=sink,
            grid=grid, return_blocks=return_blocks, scale=scale, blocks=blocks,
        )
    B, H, N, _ = q.shape
    layout = pisa_layout(grid, N, block_size, str(q.device))
    hybrid = order == "hybrid"
    spread = routing_bias and blocks is None
    key_mean, value_mean, moment_mean, query_mean, spread = block_stats(
        q, k, v, layout, moments=hybrid or spread, spread=spread, kernel=kernel
    )
    shape = (B, H, layout.num_blocks, _num_selected(density, layout.num_blocks))
    if blocks is None:
        blocks = route(query_mean, key_mean, scale, shape[3], sink=sink, spread=spread)
    else:
        blocks = _check_blocks(blocks, shape, q.device)
    out, _, _ = pisa_fwd(q, k, v, key_mean, value_mean, moment_mean if hybrid else None, layout.perm, layout.offsets,
                         blocks, layout.max_block, float(scale), kernel)
    return (out, blocks) if return_blocks else out


def _plan(perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor):
    return _desc(perm.contiguous()), _desc(offsets.contiguous()), _desc(blocks.contiguous().view(-1))


def _optional(t: torch.Tensor | None):
    return None if t is None else _desc(t)


@torch.library.custom_op("difattn::pisa_fwd", mutates_args=())
def pisa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, value_mean: torch.Tensor,
    moment_mean: torch.Tensor | None, perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, max_block: int,
    scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (B, H, N, Dv) in q's dtype, lse (B, H, N) fp32, zeta (B, H, N) fp32)``; ``moment_mean`` (``H̄``, fp32)
    adds the hybrid order's first-order term, None gives the zeroth order."""
    if kernel == "triton":
        from ..triton_kernels import pisa as tk

        return tk.pisa_fwd(q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, scale, max_block)
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    zeta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().pisa_forward(
        _desc(q), _desc(k), _desc(v), (_desc(key_mean), _desc(value_mean)), _optional(moment_mean),
        _desc(out), _desc(lse), _desc(zeta), _plan(perm, offsets, blocks), scale, torch.get_num_threads(),
    )
    return out, lse, zeta


@pisa_fwd.register_fake
def _(q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, max_block, scale, kernel):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32),
            q.new_empty(B, H, N, dtype=torch.float32))


@torch.library.custom_op("difattn::pisa_bwd", mutates_args=())
def pisa_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, value_mean: torch.Tensor,
    moment_mean: torch.Tensor | None, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, zeta: torch.Tensor,
    perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, max_block: int, scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dkey_mean, dvalue_mean, dmoment_mean)``: dk, dv of the exact entries only, the statistics'
    gradients fp32 (``dmoment_mean`` empty without ``moment_mean``)."""
    if kernel == "triton":
        from ..triton_kernels import pisa as tk

        return tk.pisa_bwd(q, k, v, key_mean, value_mean, moment_mean, out, dout, lse, zeta, perm, offsets, blocks,
                           scale, max_block)
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    dkm, dvm = (torch.empty(x.shape, dtype=torch.float32, device=q.device) for x in (key_mean, value_mean))
    dhm = torch.empty(moment_mean.shape if moment_mean is not None else (0,), dtype=torch.float32, device=q.device)
    core().pisa_backward(
        _desc(q), _desc(k), _desc(v), (_desc(key_mean), _desc(value_mean)), _optional(moment_mean),
        (_desc(out), _desc(dout), _desc(lse), _desc(zeta)), (_desc(dq), _desc(dk), _desc(dv)),
        (_desc(dkm), _desc(dvm)), None if moment_mean is None else _desc(dhm), _plan(perm, offsets, blocks), scale,
        torch.get_num_threads(),
    )
    return dq, dk, dv, dkm, dvm, dhm


@pisa_bwd.register_fake
def _(q, k, v, key_mean, value_mean, moment_mean, out, dout, lse, zeta, perm, offsets, blocks, max_block, scale,
      kernel):
    contiguous = lambda x, dtype: torch.empty(x.shape, dtype=dtype, device=q.device)  # noqa: E731
    dhm = q.new_empty(moment_mean.shape if moment_mean is not None else (0,), dtype=torch.float32)
    return (contiguous(q, q.dtype), contiguous(k, q.dtype), contiguous(v, q.dtype),
            contiguous(key_mean, torch.float32), contiguous(value_mean, torch.float32), dhm)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, max_block, scale, kernel = inputs
    out, lse, zeta = output
    ctx.save_for_backward(q, k, v, key_mean, value_mean, moment_mean, out, lse, zeta, perm, offsets, blocks)
    ctx.options = (max_block, scale, kernel)


def _backward(ctx, dout, _dlse, _dzeta):
    q, k, v, key_mean, value_mean, moment_mean, out, lse, zeta, perm, offsets, blocks = ctx.saved_tensors
    max_block, scale, kernel = ctx.options
    dq, dk, dv, dkm, dvm, dhm = pisa_bwd(q, k, v, key_mean, value_mean, moment_mean, out, dout.contiguous(), lse, zeta,
                                         perm, offsets, blocks, max_block, scale, kernel)
    return dq, dk, dv, dkm, dvm, None if moment_mean is None else dhm, None, None, None, None, None, None


pisa_fwd.register_autograd(_backward, setup_context=_setup_context)
