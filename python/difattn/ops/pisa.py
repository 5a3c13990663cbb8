"""PISA on the Rust (CPU) and Triton kernels: block statistics and routing in torch, then one fused kernel for the
exact blocks, the centroids and the first-order term, as custom ops ``difattn::pisa_fwd`` / ``difattn::pisa_bwd``.

Pipeline for ``(B, H, N, D)`` inputs, M blocks (:func:`pisa_layout`):

1. Statistics (differentiable, fp32): ``k̄_j`` and ``w_j = V̂_j / n_j`` by block sums, and for the hybrid order
   ``H̄ = (1/M) Σ_t (k_t − k̄_{j(t)}) v_tᵀ`` by one reduction over the centred keys (no per-block ``H_j``).
2. Routing (not differentiated): ``score = s q̄ k̄ᵀ`` (``+ ln(‖H_j − H̄‖_F + 1e-5)``, computed from per-block Gram
   matrices, never the ``(M, D, Dv)`` moments), the sink forced in, a stable descending sort, the first k.
3. The kernel: ``out, lse, zeta = pisa_fwd(q, k, v, k̄, w, first = q·H̄, ...)``. Its backward returns the
   gradients of q, k, v (exact entries), k̄, w and ``first``; autograd carries the last three through step 1 to
   every token of their blocks.

The selection ``blocks (B, H, M, k)`` uses the reference's block numbering (:func:`difattn.reference.pisa.pisa_layout`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import plans, reference
from .._native import core
from .._options import pisa_tile
from ..grid import TokenGrid
from .block_attention import _desc

# Inside ln(‖H_j − H̄‖_F + eps) of the routing bias (as the spec and the reference).
_ROUTING_BIAS_EPS = 1e-5
# Gram entries (B·H·blocks·b²) computed at once by the routing bias.
_GRAM_CHUNK = 1 << 24


@dataclass(frozen=True)
class PisaLayout:
    """Blocks of PISA over a sequence: ``perm`` (``(N,)`` int64, block order → token), ``offsets`` (``(M+1,)``
    int64), ``counts`` (``(M,)`` int64). ``slots`` (``(M·b_max,)`` int64: the token of each padded block slot, N for
    padding) is None when blocks are consecutive runs of ``b_max`` tokens (no grid)."""

    perm: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    slots: torch.Tensor | None
    max_block: int

    @property
    def num_blocks(self) -> int:
        return self.counts.numel()


def layout_sizes(grid: TokenGrid | None, num_tokens: int, block_size: int) -> tuple[int, int]:
    """``(M, largest block)`` of the layout, from the shapes alone."""
    if grid is None:
        return -(-num_tokens // block_size), min(block_size, num_tokens)
    return _grid_sizes(grid.frames, grid.height, grid.width, grid.text_tokens, block_size)


def _grid_sizes(frames, height, width, text_tokens, block_size: int):
    """``(M, largest block)`` of a grid layout (plain arithmetic: the sizes may be symbolic under compile)."""
    th, tw = pisa_tile(block_size)
    tiles = frames * -(-height // th) * -(-width // tw)
    largest = max(min(th, height) * min(tw, width), min(block_size, text_tokens))
    return tiles + -(-text_tokens // block_size), largest


def _grid_from(grid: list[int]) -> TokenGrid:
    frames, height, width, text_tokens, text_last = grid
    return TokenGrid(height, width, frames=frames, text_tokens=text_tokens,
                     text_position="last" if text_last else "first")


@torch.library.custom_op("difattn::pisa_grid_layout", mutates_args=())
def pisa_grid_layout(grid: list[int], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm (N,), offsets (M+1,))`` int64 of a grid's layout (the compiled core's tile order, cached). A custom
    op so that ``torch.compile`` sees an opaque call instead of the compiled core."""
    g = _grid_from(grid)
    tile = (1, *pisa_tile(block_size))
    perm = plans.tile_order(g, tile, device)[0]
    text = torch.full((-(-g.text_tokens // block_size),), block_size, dtype=torch.int64)
    if g.text_tokens:
        text[-1] = g.text_tokens - block_size * (text.numel() - 1)
    image = plans.tile_sizes(g, tile)
    counts = torch.cat([text, image] if g.text_position == "first" else [image, text])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return perm.clone(), offsets.to(device)


@pisa_grid_layout.register_fake
def _(grid, block_size, device):
    frames, height, width, text_tokens, _ = grid
    num_blocks, _ = _grid_sizes(frames, height, width, text_tokens, block_size)
    return (torch.empty(text_tokens + frames * height * width, dtype=torch.int64, device=device),
            torch.empty(num_blocks + 1, dtype=torch.int64, device=device))


@functools.lru_cache(maxsize=64)
def pisa_layout(grid: TokenGrid | None, num_tokens: int, block_size: int, device: str) -> PisaLayout:
    """The reference's layout (:func:`difattn.reference.pisa.pisa_layout`), cached (traced by ``torch.compile``)."""
    num_blocks, max_block = layout_sizes(grid, num_tokens, block_size)
    if grid is None:
        perm = torch.arange(num_tokens, device=device)
        offsets = (torch.arange(num_blocks + 1, device=device) * block_size).clamp(max=num_tokens)
        return PisaLayout(perm, offsets, offsets.diff(), None, max_block)
    text_last = int(grid.text_position == "last")
    args = [grid.frames, grid.height, grid.width, grid.text_tokens, text_last]
    perm, offsets = pisa_grid_layout(args, block_size, torch.device(device))
    counts = offsets.diff()
    slot = torch.arange(max_block, device=device)
    token = perm[(offsets[:-1, None] + slot).clamp(max=num_tokens - 1)]
    slots = torch.where(slot < counts[:, None], token, num_tokens).flatten()
    return PisaLayout(perm, offsets, counts, slots, max_block)


def _block_rows(x: torch.Tensor, layout: PisaLayout) -> torch.Tensor:
    """``(B, H, M, b_max, C)``: the rows of ``x`` ``(B, H, N, C)`` block by block, zeros in the padding."""
    B, H, N, C = x.shape
    M, b = layout.num_blocks, layout.max_block
    if layout.slots is None:
        return F.pad(x, (0, 0, 0, M * b - N)).view(B, H, M, b, C)
    return F.pad(x, (0, 0, 0, 1)).index_select(2, layout.slots).view(B, H, M, b, C)


def _work(x: torch.Tensor) -> torch.Tensor:
    """Statistics and routing run in fp32 (float64 inputs, used by tests, stay float64)."""
    return x if x.dtype == torch.float64 else x.float()


def block_stats(k: torch.Tensor, v: torch.Tensor, layout: PisaLayout, *, moments: bool):
    """``(k̄ (B, H, M, D), w (B, H, M, Dv), H̄ (B, H, D, Dv) or None)`` in fp32, differentiable."""
    key_rows = _block_rows(_work(k), layout)
    value_rows = _block_rows(_work(v), layout)
    counts = layout.counts.to(key_rows.dtype)[:, None]
    key_mean = key_rows.sum(-2) / counts
    value_mean = value_rows.sum(-2) / counts
    if not moments:
        return key_mean, value_mean, None
    # Padding rows turn nonzero once centred, but their value rows are zero: they add nothing.
    centred = (key_rows - key_mean[..., None, :]).flatten(2, 3)
    moment_mean = centred.transpose(-1, -2) @ value_rows.flatten(2, 3) / layout.num_blocks
    return key_mean, value_mean, moment_mean


@torch.no_grad()
def moment_spread(k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, moment_mean: torch.Tensor,
                  layout: PisaLayout) -> torch.Tensor:
    """``‖H_j − H̄‖_F`` ``(B, H, M)`` without the moments: ``‖H_j‖² = Σ_{t,u∈j} (k̃_t·k̃_u)(v_t·v_u)`` (Gram
    matrices of the centred keys and of the values, in chunks of blocks), ``⟨H_j, H̄⟩ = Σ_t k̃_t·(H̄ v_t)``."""
    B, H, M, b = *key_mean.shape[:3], layout.max_block
    centred = _block_rows(_work(k), layout) - key_mean[..., None, :]
    values = _block_rows(_work(v), layout)
    step = max(1, _GRAM_CHUNK // (B * H * b * b))
    norm_sq = torch.cat([
        ((c @ c.transpose(-1, -2)) * (w @ w.transpose(-1, -2))).sum((-1, -2))
        for c, w in zip(centred.split(step, dim=2), values.split(step, dim=2))
    ], dim=2)
    cross = (centred * (values @ moment_mean.transpose(-1, -2)[:, :, None])).sum((-1, -2))
    spread_sq = norm_sq - 2 * cross + moment_mean.square().sum((-1, -2))[..., None]
    return spread_sq.clamp_min(0).sqrt()


@torch.no_grad()
def route(q: torch.Tensor, key_mean: torch.Tensor, layout: PisaLayout, scale: float, num_selected: int, *,
          sink: str | None, spread: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, M, k)`` int64: each query block's top-k key blocks by descending score, ties to the lower id, the
    sink first. ``spread``: ``‖H_j − H̄‖_F`` for the routing bias."""
    query_rows = _block_rows(_work(q), layout)
    query_mean = query_rows.sum(-2) / layout.counts.to(query_rows.dtype)[:, None]
    score = scale * query_mean @ key_mean.transpose(-1, -2)
    if spread is not None:
        score = score + torch.log(spread + _ROUTING_BIAS_EPS)[:, :, None, :]
    if sink is not None:
        score[..., 0 if sink == "first" else -1] = float("inf")
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :num_selected].contiguous()


@torch.no_grad()
def _routed_blocks(q, k, v, key_mean, moment_mean, layout: PisaLayout, scale: float, num_selected: int,
                   routing_bias: bool, sink: str | None) -> torch.Tensor:
    """The selection of :func:`route`, with the routing bias's spread when asked (H̄ computed here for the zeroth
    order, which does not need it otherwise)."""
    spread = None
    if routing_bias:
        if moment_mean is None:
            moment_mean = block_stats(k, v, layout, moments=True)[2]
        spread = moment_spread(k, v, key_mean, moment_mean, layout)
    return route(q, key_mean, layout, scale, num_selected, sink=sink, spread=spread)


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
    key_mean, value_mean, moment_mean = block_stats(k, v, layout, moments=hybrid)
    shape = (B, H, layout.num_blocks, _num_selected(density, layout.num_blocks))
    if blocks is None:
        blocks = _routed_blocks(q, k, v, key_mean, moment_mean, layout, scale, shape[3], routing_bias, sink)
    else:
        blocks = _check_blocks(blocks, shape, q.device)
    first = (q.float() @ moment_mean).contiguous() if hybrid else None
    out, _, _ = pisa_fwd(q, k, v, key_mean.contiguous(), value_mean.contiguous(), first, layout.perm, layout.offsets,
                         blocks, layout.max_block, float(scale), kernel)
    return (out, blocks) if return_blocks else out


def _plan(perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor):
    return _desc(perm.contiguous()), _desc(offsets.contiguous()), _desc(blocks.contiguous().view(-1))


@torch.library.custom_op("difattn::pisa_fwd", mutates_args=())
def pisa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, value_mean: torch.Tensor,
    first: torch.Tensor | None, perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, max_block: int,
    scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (B, H, N, Dv) in q's dtype, lse (B, H, N) fp32, zeta (B, H, N) fp32)``; ``first = q·H̄`` (fp32) adds
    the hybrid order's term, None gives the zeroth order."""
    if kernel == "triton":
        from ..triton_kernels import pisa as tk

        return tk.pisa_fwd(q, k, v, key_mean, value_mean, first, perm, offsets, blocks, scale, max_block)
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    zeta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().pisa_forward(
        _desc(q), _desc(k), _desc(v), (_desc(key_mean), _desc(value_mean)), None if first is None else _desc(first),
        _desc(out), _desc(lse), _desc(zeta), _plan(perm, offsets, blocks), scale, torch.get_num_threads(),
    )
    return out, lse, zeta


@pisa_fwd.register_fake
def _(q, k, v, key_mean, value_mean, first, perm, offsets, blocks, max_block, scale, kernel):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32),
            q.new_empty(B, H, N, dtype=torch.float32))


@torch.library.custom_op("difattn::pisa_bwd", mutates_args=())
def pisa_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, value_mean: torch.Tensor,
    dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, rho: torch.Tensor | None, perm: torch.Tensor,
    offsets: torch.Tensor, blocks: torch.Tensor, max_block: int, scale: float, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dkey_mean, dvalue_mean)``: dk, dv of the exact entries only, the centroid gradients fp32."""
    if kernel == "triton":
        from ..triton_kernels import pisa as tk

        return tk.pisa_bwd(q, k, v, key_mean, value_mean, dout, lse, delta, rho, perm, offsets, blocks, scale,
                           max_block)
    dq, dk, dv = (torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))
    dkm = torch.empty(key_mean.shape, dtype=torch.float32, device=q.device)
    dvm = torch.empty(value_mean.shape, dtype=torch.float32, device=q.device)
    core().pisa_backward(
        _desc(q), _desc(k), _desc(v), (_desc(key_mean), _desc(value_mean)), _desc(dout), _desc(lse), _desc(delta),
        None if rho is None else _desc(rho), (_desc(dq), _desc(dk), _desc(dv)), (_desc(dkm), _desc(dvm)),
        _plan(perm, offsets, blocks), scale, torch.get_num_threads(),
    )
    return dq, dk, dv, dkm, dvm


@pisa_bwd.register_fake
def _(q, k, v, key_mean, value_mean, dout, lse, delta, rho, perm, offsets, blocks, max_block, scale, kernel):
    return (torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(key_mean, dtype=torch.float32),
            torch.empty_like(value_mean, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mean, value_mean, first, perm, offsets, blocks, max_block, scale, kernel = inputs
    out, lse, zeta = output
    ctx.save_for_backward(q, k, v, key_mean, value_mean, first, out, lse, zeta, perm, offsets, blocks)
    ctx.options = (max_block, scale, kernel)


def _backward(ctx, dout, _dlse, _dzeta):
    q, k, v, key_mean, value_mean, first, out, lse, zeta, perm, offsets, blocks = ctx.saved_tensors
    max_block, scale, kernel = ctx.options
    dout = dout.contiguous()
    grad = dout.float()
    delta = (grad * out.float()).sum(-1)
    rho = None if first is None else scale * (first * grad).sum(-1)
    dq, dk, dv, dkm, dvm = pisa_bwd(q, k, v, key_mean, value_mean, dout, lse, delta, rho, perm, offsets, blocks,
                                    max_block, scale, kernel)
    # out = (...) + scale · zeta · first, so d first = scale · zeta · dout.
    dfirst = None if first is None else (scale * zeta)[..., None] * grad
    return dq, dk, dv, dkm, dvm, dfirst, None, None, None, None, None, None


pisa_fwd.register_autograd(_backward, setup_context=_setup_context)
