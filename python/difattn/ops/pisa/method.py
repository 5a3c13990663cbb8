"""PISA on the fast backends (arguments validated and options resolved by :func:`difattn.pisa_attention`).

Pipeline for ``(B, H, N, D)`` inputs over M blocks (:mod:`.layout`):

1. Statistics (:mod:`.stats`, differentiable): ``k̄_j``, ``w_j = V̂_j / n_j`` and, for the hybrid order,
   ``H̄`` by reduction; plus ``q̄_j`` and the routing bias's ``‖H_j − H̄‖_F`` (not differentiated).
2. Routing: ``score = s q̄ k̄ᵀ (+ ln(‖H_j − H̄‖_F + 1e-5))``, the sink forced in, a stable descending sort, the first
   ``k = max(1, floor(density · M))``.
3. The fused kernel (:mod:`.op`): exact blocks, centroids and the first-order term.

The selection ``blocks (B, H, M, k)`` uses the reference's block numbering (:func:`difattn.reference.pisa.pisa_layout`).
"""

from __future__ import annotations

import torch

from ..._options import pisa_num_selected
from ...grid import TokenGrid
from .layout import pisa_layout
from .op import pisa_fwd
from .stats import block_stats, route


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


def pisa_on_kernels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, density: float, block_size: int, order: str,
    routing_bias: bool, sink: str | None, grid: TokenGrid | None, return_blocks: bool, scale: float, backend: str,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PISA's zeroth and hybrid orders on ``backend``'s kernels; ``blocks`` a given selection ``(B, H, M, k)``
    (validated) instead of the routing. Returns ``(B, H, N, Dv)``, plus the selection with ``return_blocks``."""
    B, H, N, _ = q.shape
    layout = pisa_layout(grid, N, block_size, str(q.device))
    hybrid = order == "hybrid"
    spread = routing_bias and blocks is None
    key_mean, value_mean, moment_mean, query_mean, spread = block_stats(
        q, k, v, layout, moments=hybrid or spread, spread=spread, backend=backend
    )
    shape = (B, H, layout.num_blocks, pisa_num_selected(density, layout.num_blocks))
    if blocks is None:
        blocks = route(query_mean, key_mean, scale, shape[3], sink=sink, spread=spread)
    else:
        blocks = _check_blocks(blocks, shape, q.device)
    out, _, _ = pisa_fwd(q, k, v, key_mean, value_mean, moment_mean if hybrid else None, layout.perm, layout.offsets,
                         blocks, layout.max_block, float(scale), backend)
    return (out, blocks) if return_blocks else out
