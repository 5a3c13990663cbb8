"""PISA on the fast backends (arguments validated and options resolved by :func:`difattn.pisa_attention`).

Pipeline for ``(B, H, N, D)`` inputs over M blocks (:mod:`.layout`):

1. Statistics (:mod:`.stats`, differentiable): ``k̄_j``, ``w_j = V̂_j / n_j`` and, for the hybrid order,
   ``H̄ = (1/N) Σ_j H_j`` by reduction; plus ``q̄_j`` and the routing bias's statistic (not differentiated).
2. Routing: ``score = s q̄ k̄ᵀ (+ routing bias)``, the sink forced in, a stable descending sort, the first
   ``k = max(1, floor(density · M))``.
3. The fused kernel (:mod:`.op`): exact blocks, centroids and the first-order term ``s·(Σ_U n_j e^{c_j−m})·q·H̄``.

The selection ``blocks (B, H, M, k)`` uses the reference's block numbering (:func:`difattn.reference.pisa.pisa_layout`).
"""

from __future__ import annotations

import torch

from ..._options import pisa_num_selected
from ...grid import TokenGrid
from .layout import pisa_layout
from .op import pisa_fwd
from .stats import block_stats, route, score_bias


def pisa_on_kernels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, density: float, block_size: int, order: str,
    routing_bias: str | None, sink: str | None, grid: TokenGrid | None, return_blocks: bool, scale: float,
    backend: str, blocks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PISA's zeroth and hybrid orders on ``backend``'s kernels; ``routing_bias`` resolved to a name or None;
    ``blocks`` a validated selection ``(B, H, M, k)`` to use instead of the routing. Returns ``(B, H, N, Dv)``, plus
    the selection with ``return_blocks``."""
    B, H, N, _ = q.shape
    layout = pisa_layout(grid, N, block_size, str(q.device))
    hybrid = order == "hybrid"
    bias = routing_bias if blocks is None else None
    key_mean, value_mean, moment_mean, query_mean, statistic = block_stats(
        q, k, v, layout, moments=hybrid, bias=bias, backend=backend
    )
    if blocks is None:
        num_selected = pisa_num_selected(density, layout.num_blocks)
        bias_row = None if bias is None else score_bias(statistic, bias)
        blocks = route(query_mean, key_mean, scale, num_selected, sink=sink, bias=bias_row, backend=backend)
    out, _, _ = pisa_fwd(q, k, v, key_mean, value_mean, moment_mean if hybrid else None, layout.perm, layout.offsets,
                         blocks.contiguous(), layout.max_block, float(scale), backend)
    return (out, blocks) if return_blocks else out
