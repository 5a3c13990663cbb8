"""Quality metrics: how far a method's attention output (or a whole sampled latent) drifts from dense attention.

Against the float64 dense output ``O`` of the same q, k, v (``(B, H, N, Dv)``), a method's output ``Ô``:

- ``rel_err_dense = ‖Ô − O‖ / ‖O‖`` (Frobenius over everything) and ``cos_dense = ⟨Ô, O⟩ / (‖Ô‖ ‖O‖)``;
- ``worst_head_rel_err``: the largest ``‖Ô_bh − O_bh‖ / ‖O_bh‖`` over the (batch, head) pairs;
- ``recall``: the softmax-mass recall, the share of dense attention probability
  ``P = softmax(s q kᵀ)`` that lies on the (query, key) pairs the method computes exactly, averaged over
  queries, ``mean_i Σ_j P_ij [j kept for i]`` (``worst_head_recall``: the smallest head's mean). The kept pairs
  come from the method itself: CLEAR's and GRAT's masks, PISA's selected blocks (``return_blocks=True``) and
  LLSA's selected fine blocks ``I_1`` (``return_indices=True``), mapped from the ops' internal block numbering back
  to the raster order. Linear attention and DyDiLA compute no exact pair: ``None``.
- For PISA, the Taylor part (every block it does not select): ``taylor_mass = 1 − recall``, the dense mass on
  those blocks, next to ``taylor_mass_est``, the share PISA's own softmax gives them,
  ``mean_i C_i / (E_i + C_i)`` with ``E_i = Σ_{u exact} e^{s q_i·k_u}`` and ``C_i = Σ_{j Taylor} n_j e^{s q_i·k̄_j}``
  (the first-order term adds to the numerator only). By Jensen ``e^{s q·k̄_j} ≤ mean_{u∈j} e^{s q·k_u}``, so the
  estimate never exceeds the block's true mass; the gap is what the Taylor part loses.

End to end (a sampled latent or image ``x̂`` against the dense run's ``x``, same seed and steps):
``psnr = 10 log10(R² / mean((x̂ − x)²))`` with ``R = max x − min x`` (the dense sample's range), and ``ssim``,
the mean structural similarity of Wang et al. (2004) over channels, Gaussian window σ = 1.5 (7 taps, shrunk on
grids smaller than that), ``C1 = (0.01 R)²``, ``C2 = (0.03 R)²``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import reference
from ..grid import TokenGrid
from ..reference.ordering import zorder_permutation
from ..reference.pisa import pisa_layout

# Queries per chunk when the dense probabilities are formed: (B*H) * chunk * N float64 values at once.
_QUERY_CHUNK = 512

KeptFn = Callable[[int, int], torch.Tensor]  # (start, stop) -> bool (B|1, H|1, stop - start, N)


def dense_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense softmax attention in float64, ``(B, H, N, Dv)``: the target every method is measured against."""
    return reference.dense_attention(q.double(), k.double(), v.double(), scale=scale)


def output_errors(out: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """``rel_err_dense``, ``cos_dense`` and ``worst_head_rel_err`` of ``out`` against ``dense`` (both
    ``(B, H, N, Dv)``; computed in float64)."""
    out, dense = out.detach().double(), dense.detach().double()
    diff = out - dense
    per_head = diff.flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1).clamp_min(1e-300)
    cos = (out * dense).sum() / (out.norm() * dense.norm()).clamp_min(1e-300)
    return {
        "rel_err_dense": float(diff.norm() / dense.norm().clamp_min(1e-300)),
        "cos_dense": float(cos),
        "worst_head_rel_err": float(per_head.max()),
    }


def recalls(q: torch.Tensor, k: torch.Tensor, kept: dict[str, KeptFn], *, scale: float | None = None) -> dict[str, tuple[float, float]]:
    """Softmax-mass recall of several selections in one pass over the dense probabilities.

    Args:
        q, k: ``(B, H, N, D)``.
        kept: name -> ``fn(start, stop)`` giving the kept pairs of query rows ``start:stop`` as a bool tensor
            broadcastable to ``(B, H, stop − start, N)``.

    Returns name -> ``(recall, worst_head_recall)``: the mean over every (batch, head, query) of the kept
    probability mass, and the smallest per-(batch, head) mean.
    """
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    q64, k64 = q.detach().double(), k.detach().double()
    sums = {name: torch.zeros(B, H, dtype=torch.float64, device=q.device) for name in kept}
    for start in range(0, N, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, N)
        probs = torch.softmax(q64[:, :, start:stop] @ k64.transpose(-1, -2) * scale, dim=-1)
        for name, fn in kept.items():
            sums[name] += (probs * fn(start, stop)).sum(dim=(-1, -2))
    return {name: (float(s.mean() / N), float(s.min() / N)) for name, s in sums.items()}


def pair_mask(mask: torch.Tensor) -> KeptFn:
    """Kept pairs of a fixed ``(N, N)`` mask (CLEAR's, GRAT's)."""
    return lambda start, stop: mask[start:stop]


def block_selection(chosen: torch.Tensor, token_block: torch.Tensor) -> KeptFn:
    """Kept pairs of a per-(batch, head) block selection: ``chosen`` ``(B, H, M, M)`` bool (query block, key block)
    and ``token_block`` ``(N,)`` the block of each token in raster order."""
    return lambda start, stop: chosen[:, :, token_block[start:stop]][..., token_block]


def _chosen(selection: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``(B, H, M, M)`` bool from per-query-block key block ids ``(B, H, M, k)``."""
    B, H = selection.shape[:2]
    chosen = torch.zeros(B, H, num_blocks, num_blocks, dtype=torch.bool, device=selection.device)
    return chosen.scatter_(-1, selection, True)


def _raster_blocks(perm: torch.Tensor | None, block_of_position: torch.Tensor) -> torch.Tensor:
    """Block of each token in raster order, given the block of each position of the permuted sequence
    (``permuted = x[perm]``, so raster token ``perm[i]`` sits at position i)."""
    if perm is None:
        return block_of_position
    out = torch.empty_like(block_of_position)
    out[perm.to(out.device)] = block_of_position
    return out


def pisa_kept(blocks: torch.Tensor, grid: TokenGrid | None, num_tokens: int, block_size: int) -> KeptFn:
    """PISA's exact pairs from its selection ``(B, H, M, k)`` (``return_blocks=True``), numbered as
    :func:`difattn.reference.pisa.pisa_layout` lays the blocks out."""
    return block_selection(*pisa_blocks(blocks, grid, num_tokens, block_size))


def pisa_blocks(blocks: torch.Tensor, grid: TokenGrid | None, num_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen (B, H, M, M) bool, token_block (N,))`` of a PISA selection, tokens in raster order."""
    perm, sizes = pisa_layout(grid, num_tokens, block_size)
    position_block = torch.repeat_interleave(torch.arange(sizes.numel(), device=blocks.device), sizes.to(blocks.device))
    return _chosen(blocks, sizes.numel()), _raster_blocks(perm, position_block)


def llsa_kept(indices: list[torch.Tensor], grid: TokenGrid | None, num_tokens: int, block_size: int) -> KeptFn:
    """LLSA's exact pairs: the fine tokens of the level-1 blocks ``I_1`` (``return_indices=True``), blocks being
    runs of ``block_size`` over the Z-ordered sequence (text in place) when a grid is given."""
    fine = indices[0]
    position_block = torch.arange(num_tokens, device=fine.device) // block_size
    perm = None if grid is None else zorder_permutation(grid)
    return block_selection(_chosen(fine, -(-num_tokens // block_size)), _raster_blocks(perm, position_block))


def pisa_taylor_mass(q: torch.Tensor, k: torch.Tensor, blocks: torch.Tensor, grid: TokenGrid | None, block_size: int,
                     *, scale: float | None = None) -> float:
    """PISA's own softmax share on its Taylor blocks, ``mean_i C_i / (E_i + C_i)`` (module docstring), float64."""
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    chosen, token_block = pisa_blocks(blocks, grid, N, block_size)
    q64, k64 = q.detach().double(), k.detach().double()
    num_blocks = chosen.shape[-1]
    counts = torch.bincount(token_block, minlength=num_blocks).to(torch.float64)
    key_mean = torch.zeros(B, H, num_blocks, D, dtype=torch.float64, device=q.device)
    key_mean.index_add_(2, token_block, k64)
    key_mean /= counts[:, None]
    total = 0.0
    for start in range(0, N, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, N)
        rows = chosen[:, :, token_block[start:stop]]  # (B, H, c, M): selected key blocks of each query
        token_logits = q64[:, :, start:stop] @ k64.transpose(-1, -2) * scale
        centroid_logits = q64[:, :, start:stop] @ key_mean.transpose(-1, -2) * scale + counts.log()
        exact = token_logits.masked_fill(~rows[..., token_block], float("-inf")).logsumexp(-1)
        taylor = centroid_logits.masked_fill(rows, float("-inf")).logsumexp(-1)
        total += float(torch.sigmoid(taylor - exact).sum())  # C / (E + C) = sigmoid(ln C − ln E)
    return total / (B * H * N)


def psnr(x: torch.Tensor, dense: torch.Tensor) -> float:
    """``10 log10(R² / MSE)`` of ``x`` against ``dense`` with ``R`` the dense sample's range; ``inf`` when equal."""
    x, dense = x.detach().double(), dense.detach().double()
    mse = float(((x - dense) ** 2).mean())
    peak = float(dense.max() - dense.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(x: torch.Tensor, dense: torch.Tensor) -> float:
    """Mean SSIM of ``x`` against ``dense``, both ``(B, C, [F,] height, width)`` (frames fold into the batch)."""
    x, dense = x.detach().double(), dense.detach().double()
    if x.dim() == 5:
        x, dense = (t.transpose(1, 2).flatten(0, 1) for t in (x, dense))
    peak = float(dense.max() - dense.min())
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    side = min(7, x.shape[-1], x.shape[-2])
    offsets = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    w = torch.exp(-0.5 * (offsets / 1.5) ** 2)
    window = (w[:, None] * w[None, :] / w.sum() ** 2).expand(x.shape[1], 1, side, side)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(dense)
    var_x, var_y = blur(x * x) - mu_x**2, blur(dense * dense) - mu_y**2
    cov = blur(x * dense) - mu_x * mu_y
    score = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(score.mean())
