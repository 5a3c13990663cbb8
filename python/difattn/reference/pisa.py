"""PISA in plain torch: exact attention on each query block's top key blocks, a Taylor expansion of the rest (Li
et al., "PISA: Piecewise Sparse Attention Is Wiser for Efficient Diffusion Transformers", arXiv 2602.01077).

The attention is written as one masked softmax over ``N + M`` entries per query: the N tokens (allowed where
their block is selected) and the M block centroids (allowed where the block is not selected, logit
``+ ln n_j``). A centroid's softmax weight ``p_j = n_j e^{c_j - m} / den`` times the block's mean value is the
spec's ``e^{c_j - m} V̂_j / den``, and ``p_j / n_j`` is the factor of its first-order term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_bool, check_qkv, resolve_scale
from .._options import check_pisa, pisa_num_selected, pisa_tile
from ..grid import TokenGrid, check_grid
from .ordering import inverse_permutation, pisa_block_sizes, tile_permutation

# Queries per chunk: (B*H) * chunk * (N + M) logits live at once besides what autograd keeps.
_QUERY_CHUNK = 1024
# Inside ln(‖H_j − H̄‖_F + eps) of the routing bias.
_ROUTING_BIAS_EPS = 1e-5


class _BlockStats(NamedTuple):
    """Per-block statistics in the work dtype; ``M`` blocks, ``n_j`` tokens in block j."""

    counts: torch.Tensor  # (M,) n_j
    key_mean: torch.Tensor  # (B, H, M, D) k̄_j
    value_sum: torch.Tensor  # (B, H, M, Dv) V̂_j
    moment_mean: torch.Tensor  # (B, H, D, Dv) H̄ = mean over all blocks of H_j
    moments: torch.Tensor | None  # (B, H, M, D, Dv) H_j = Σ_{t∈j} (k_t − k̄_j) v_tᵀ, when needed


def pisa_layout(grid: TokenGrid | None, num_tokens: int, block_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The block layout of PISA: ``(perm, sizes)``.

    ``perm`` (``(N,)`` int64, None without a grid) puts the tokens in block order, ``x[..., perm, :]``; blocks are
    then consecutive runs of ``sizes`` (``(M,)`` int64) over the permuted sequence. Without a grid: runs of
    ``block_size`` tokens (the last may be short). With a grid: ``ceil(T / b)`` text blocks on the text side (text
    tokens keep their positions), then one block per ``th x tw`` image tile per frame in raster order
    ``(frame, tile row, tile column)``, tokens inside a tile in raster order (:func:`difattn._options.pisa_tile`).
    """
    if grid is None:
        return None, pisa_block_sizes(None, num_tokens, block_size, (1, block_size))
    tile = pisa_tile(block_size)
    return tile_permutation(grid, (1, *tile)), pisa_block_sizes(grid, num_tokens, block_size, tile)


def pisa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    density: float = 0.125,
    block_size: int = 64,
    order: str = "hybrid",
    routing_bias: bool = False,
    sink: str | None = None,
    grid: TokenGrid | None = None,
    return_blocks: bool = False,
    scale: float | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PISA attention: exact on the ``k = max(1, floor(density * M))`` routed key blocks of each query block, a
    zeroth- or first-order Taylor expansion around the block mean key on the others, in one softmax.

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``.
        order: ``"zeroth"``, ``"hybrid"`` (mean first-order term H̄) or ``"first"`` (per-block H_j).
        routing_bias: add ``ln(‖H_j − H̄‖_F + 1e-5)`` to the routing score of key block j.
        sink: ``"first"`` / ``"last"`` puts block 0 / M−1 in every selection (one of the k places).
        grid: a :class:`~difattn.TokenGrid`; blocks then never mix text and image (see :func:`pisa_layout`).
        blocks: ``(B, H, M, k)`` int64, a selection to use instead of routing (``routing_bias`` and ``sink`` are
            then ignored): for each query block, k distinct key block ids.

    Block numbering (query and key side alike): blocks in sequence order of the permuted tokens of
    :func:`pisa_layout`; without a grid block j holds tokens ``[j*b, (j+1)*b)``; with a grid the text blocks come
    first when the text is first and last when it is last; the image tiles, in raster order, fill the rest.

    Returns ``(B, H, N, Dv)`` in q's dtype and the original token order; with ``return_blocks=True`` also the
    selection ``(B, H, M, k)`` int64, each row by descending routing score (the sink first). Routing is not
    differentiated; gradients flow through the exact logits, k̄_j, V̂_j, H̄ and H_j.
    """
    B, H, N, D, Dv = check_qkv(q, k, v)
    check_pisa(density, block_size, order, routing_bias, sink)
    check_bool("return_blocks", return_blocks)
    if grid is not None:
        check_grid(grid, N)
    scale = resolve_scale(scale, D)
    perm, sizes = pisa_layout(grid, N, block_size)
    if perm is not None:
        perm = perm.to(q.device)
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    stats = _block_stats(k, v, sizes.to(q.device), with_moments=order == "first" or (routing_bias and blocks is None))
    num_selected = pisa_num_selected(density, sizes.numel())
    if blocks is None:
        blocks = _route(q, stats, scale, num_selected, routing_bias=routing_bias, sink=sink)
    else:
        _check_blocks(blocks, (B, H, sizes.numel(), num_selected), q.device)
    out = _attend(q, k, v, stats, blocks, scale, order)
    if perm is not None:
        out = out[:, :, inverse_permutation(perm)]
    return (out, blocks) if return_blocks else out


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, routing and softmax run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(B, H, M, b_max, C)``: the rows of ``x`` ``(B, H, N, C)`` block by block, zeros past a block's end."""
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(counts.max()), device=x.device)
    inside = offsets < counts[:, None]
    rows = torch.where(inside, starts[:, None] + offsets, 0)
    return x[:, :, rows] * inside[..., None].to(x.dtype)


def _block_stats(k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, *, with_moments: bool) -> _BlockStats:
    """k̄_j, V̂_j and H̄ (without materialising the H_j), plus every H_j when ``with_moments``."""
    work = _work_dtype(k.dtype)
    key_rows = _block_rows(k.to(work), counts)
    value_rows = _block_rows(v.to(work), counts)
    key_mean = key_rows.sum(-2) / counts[:, None].to(work)
    # Padding rows of key_rows turn nonzero here, but their value rows are zero, so they add nothing below.
    centred = key_rows - key_mean[..., None, :]
    moment_mean = centred.flatten(2, 3).transpose(-1, -2) @ value_rows.flatten(2, 3) / counts.numel()
    moments = centred.transpose(-1, -2) @ value_rows if with_moments else None
    return _BlockStats(counts, key_mean, value_rows.sum(-2), moment_mean, moments)


@torch.no_grad()
def _route(
    q: torch.Tensor, stats: _BlockStats, scale: float, num_selected: int, *, routing_bias: bool, sink: str | None
) -> torch.Tensor:
    """``(B, H, M, k)`` int64: each query block's top-k key blocks, by descending score, ties to the lower id."""
    work = stats.key_mean.dtype
    query_mean = _block_rows(q.to(work), stats.counts).sum(-2) / stats.counts[:, None].to(work)
    score = scale * query_mean @ stats.key_mean.transpose(-1, -2)
    if routing_bias:
        spread = (stats.moments - stats.moment_mean[:, :, None]).flatten(-2).norm(dim=-1)
        score = score + torch.log(spread + _ROUTING_BIAS_EPS)[:, :, None, :]
    if sink is not None:
        score[..., 0 if sink == "first" else -1] = float("inf")
    # A stable descending sort keeps equal scores in ascending block order (torch.topk does not promise that).
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :num_selected]


def _check_blocks(blocks: object, shape: tuple[int, int, int, int], device: torch.device) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.int64:
        raise TypeError(f"blocks must be an int64 torch.Tensor of shape (B, H, M, k) = {shape}, got {blocks!r:.80}")
    if tuple(blocks.shape) != shape:
        raise ValueError(f"blocks must have shape (B, H, M, k) = {shape}, got {tuple(blocks.shape)}")
    if blocks.device != device:
        raise ValueError(f"blocks must be on the device of q ({device}), got {blocks.device}")
    if int(blocks.min()) < 0 or int(blocks.max()) >= shape[2]:
        raise ValueError(f"blocks must hold block ids in [0, {shape[2]}), got values in "
                         f"[{int(blocks.min())}, {int(blocks.max())}]")
    ascending = blocks.sort(dim=-1).values
    if bool((ascending[..., 1:] == ascending[..., :-1]).any()):
        raise ValueError("blocks must not repeat a block id within a query block's selection")


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stats: _BlockStats, blocks: torch.Tensor, scale: float,
    order: str,
) -> torch.Tensor:
    """``(B, H, N, Dv)`` in q's dtype, in block order: the spec's ``num / den`` for every query token."""
    B, H, N, _ = q.shape
    num_blocks = stats.counts.numel()
    selected = torch.zeros(B, H, num_blocks, num_blocks, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, blocks, True)
    block_of_token = torch.repeat_interleave(torch.arange(num_blocks, device=q.device), stats.counts)
    keys = torch.cat([k, stats.key_mean.to(k.dtype)], dim=2)
    values = torch.cat([v, (stats.value_sum / stats.counts[:, None]).to(v.dtype)], dim=2)
    work = stats.key_mean.dtype
    bias = torch.cat([torch.zeros(N, dtype=work, device=q.device), torch.log(stats.counts.to(work))])
    outputs = []
    for start in range(0, N, _QUERY_CHUNK):
        rows = selected[:, :, block_of_token[start : start + _QUERY_CHUNK]]  # (B, H, chunk, M)
        allowed = torch.cat([rows[..., block_of_token], ~rows], dim=-1)
        outputs.append(_attend_chunk(q[:, :, start : start + _QUERY_CHUNK], keys, values, bias, allowed, stats,
                                     scale, order))
    return torch.cat(outputs, dim=2).to(q.dtype)


def _attend_chunk(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, allowed: torch.Tensor,
    stats: _BlockStats, scale: float, order: str,
) -> torch.Tensor:
    """One chunk of queries ``(B, H, c, D)`` against tokens + centroids; ``(B, H, c, Dv)`` in the work dtype."""
    work = bias.dtype
    logits = (q @ keys.transpose(-1, -2)).to(work) * scale + bias
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (probs.to(values.dtype) @ values).to(work)
    if order == "zeroth":
        return out
    num_tokens = keys.shape[2] - stats.counts.numel()
    centroid_weight = probs[..., num_tokens:] / stats.counts.to(work)  # e^{c_j − m} / den, 0 on selected blocks
    query = q.to(work)
    if order == "hybrid":
        first = centroid_weight.sum(-1, keepdim=True) * (query @ stats.moment_mean)
    else:
        first = torch.einsum("bhtm,bhtd,bhmde->bhte", centroid_weight, query, stats.moments)
    return out + scale * first
