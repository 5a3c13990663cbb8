"""PISA in plain torch: exact attention on each query block's top key blocks, a Taylor expansion of the rest (Li
et al., "PISA: Piecewise Sparse Attention Is Wiser for Efficient Diffusion Transformers", arXiv 2602.01077).

The attention is written as one masked softmax over ``Nk + M`` entries per query: the Nk key tokens (allowed where
their block is selected) and the M key-block centroids (allowed where the block is not selected, logit
``+ ln n_j``). A centroid's softmax weight ``p_j = n_j e^{c_j - m} / den`` times the block's mean value is the
spec's ``e^{c_j - m} V̂_j / den``; ``p_j / n_j`` is the factor of its first-order term ``s·q·H_j``.

The hybrid order stands in for every unselected block's ``H_j`` with ``n_j·H̄``, ``H̄ = (1/Nk) Σ_j H_j`` the mean
moment per key token: ``FIRST = s·(Σ_U n_j e^{c_j−m})·q·H̄``, the authors' released kernel's weighting (a block's
moment grows with its size). With equal blocks ``n_j·H̄ = (1/M) Σ_j H_j``, the paper's mean moment; with ragged
blocks (border tiles, text runs, a short last block) the two differ and this one is the better approximation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_bool, check_qkv, resolve_scale
from .._options import check_pisa, check_pisa_blocks, pisa_num_selected, pisa_tile
from ..grid import TokenGrid, check_grid
from .ordering import inverse_permutation, pisa_block_sizes, tile_permutation

# Queries per chunk: (B*H) * chunk * (Nk + M) logits live at once besides what autograd keeps.
_QUERY_CHUNK = 1024
# Inside ln(‖·‖_F + eps) of the moment routing biases, and the floor of the key variance in ln(max(var, eps)).
_MOMENT_BIAS_EPS = 1e-5
_VARIANCE_BIAS_EPS = 1e-8


class _BlockStats(NamedTuple):
    """Per key block statistics in the work dtype; ``M`` key blocks, ``n_j`` tokens in block j."""

    counts: torch.Tensor  # (M,) n_j
    longest: int  # max_j n_j, read on the CPU (so meta and fake tensors work)
    key_mean: torch.Tensor  # (B, H, M, D) k̄_j
    value_sum: torch.Tensor  # (B, H, M, Dv) V̂_j
    moment_mean: torch.Tensor  # (B, H, D, Dv) H̄ = (1/Nk) Σ_j H_j, the mean moment per key token
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
    routing_bias: bool | str = False,
    sink: str | None = None,
    grid: TokenGrid | None = None,
    return_blocks: bool = False,
    scale: float | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PISA attention: exact on the ``k = max(1, floor(density * Mk))`` routed key blocks of each query block, a
    zeroth- or first-order Taylor expansion around the block mean key on the others, in one softmax.

    Args:
        q: ``(B, H, N, D)``; k: ``(B, H, Nk, D)``; v: ``(B, H, Nk, Dv)``. ``Nk != N`` (cross-attention) only
            without a grid: query blocks are then runs of ``block_size`` over q, key blocks runs over k.
        order: ``"zeroth"``, ``"hybrid"`` (``FIRST = s·(Σ_U n_j e^{c_j−m})·q·H̄``, ``H̄ = (1/Nk) Σ_j H_j``) or
            ``"first"`` (per-block ``H_j``).
        routing_bias: added to the routing score of key block j: ``"centered"`` (or ``True``, the paper)
            ``ln(‖H_j − (1/M) Σ_i H_i‖_F + 1e-5)``; ``"uncentered"`` (the authors' released kernels)
            ``ln(‖H_j‖_F + 1e-5)``; ``"key_variance"`` (the authors' trainable zeroth-order variant)
            ``ln(max(var_j, 1e-8))`` with ``var_j = (1/n_j) Σ_{t∈j} ‖k_t − k̄_j‖²``; ``False`` none.
        sink: ``"first"`` / ``"last"`` puts key block 0 / Mk−1 in every selection (one of the k places).
        grid: a :class:`~difattn.TokenGrid`; blocks then never mix text and image (see :func:`pisa_layout`).
        blocks: ``(B, H, M, k)`` int64, a selection to use instead of routing (``routing_bias`` and ``sink`` are
            then not used): for each query block, k distinct key block ids.

    Block numbering (query and key side alike): blocks in sequence order of the permuted tokens of
    :func:`pisa_layout`; without a grid block j holds tokens ``[j*b, (j+1)*b)``; with a grid the text blocks come
    first when the text is first and last when it is last; the image tiles, in raster order, fill the rest.

    Returns ``(B, H, N, Dv)`` in q's dtype and the original token order; with ``return_blocks=True`` also the
    selection ``(B, H, M, k)`` int64, each row by descending routing score (the sink first). Routing is not
    differentiated; gradients flow through the exact logits, k̄_j, V̂_j, H̄ and H_j.
    """
    B, H, N, D, Dv = check_qkv(q, k, v, cross=True)
    bias = check_pisa(density, block_size, order, routing_bias, sink)
    check_bool("return_blocks", return_blocks)
    if grid is not None:
        check_grid(grid, N)
        if k.shape[2] != N:
            raise ValueError(f"grid: cross-attention (k has {k.shape[2]} tokens, q {N}) runs without a grid")
    scale = resolve_scale(scale, D)
    perm, query_sizes = pisa_layout(grid, N, block_size)
    key_sizes = query_sizes if k.shape[2] == N else pisa_layout(None, k.shape[2], block_size)[1]
    if perm is not None:
        perm = perm.to(q.device)
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    route_bias = bias if blocks is None else None
    # Block sizes are made on the CPU; their maxima are read there, before the sizes move to q's device.
    stats = _block_stats(k, v, key_sizes.to(q.device), int(key_sizes.max()),
                         with_moments=order == "first" or route_bias in ("centered", "uncentered"))
    shape = (B, H, query_sizes.numel(), pisa_num_selected(density, key_sizes.numel()))
    query_longest, query_sizes = int(query_sizes.max()), query_sizes.to(q.device)
    if blocks is None:
        blocks = _route(q, k, (query_sizes, query_longest), stats, scale, shape[3], bias=route_bias, sink=sink)
    else:
        blocks = check_pisa_blocks(blocks, shape, key_sizes.numel(), q.device)
    out = _attend(q, k, v, query_sizes, stats, blocks, scale, order)
    if perm is not None:
        out = out[:, :, inverse_permutation(perm)]
    return (out, blocks) if return_blocks else out


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, routing and softmax run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(x: torch.Tensor, counts: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, inside)``: ``rows`` ``(B, H, M, b_max, C)`` the rows of ``x`` ``(B, H, N, C)`` block by block, zeros
    past a block's end; ``inside`` ``(M, b_max)`` bool, True on real rows."""
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(longest, device=x.device)  # longest = max(counts) = b_max
    inside = offsets < counts[:, None]
    rows = torch.where(inside, starts[:, None] + offsets, 0)
    return x[:, :, rows] * inside[..., None].to(x.dtype), inside


def _block_mean(x: torch.Tensor, counts: torch.Tensor, longest: int) -> torch.Tensor:
    """``(B, H, M, C)``: the mean of each block's rows of ``x`` in the work dtype."""
    rows, _ = _block_rows(x.to(_work_dtype(x.dtype)), counts, longest)
    return rows.sum(-2) / counts[:, None].to(rows.dtype)


def _block_stats(
    k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, longest: int, *, with_moments: bool
) -> _BlockStats:
    """k̄_j, V̂_j and H̄ (without materialising the H_j), plus every H_j when ``with_moments``."""
    work = _work_dtype(k.dtype)
    key_rows, _ = _block_rows(k.to(work), counts, longest)
    value_rows, _ = _block_rows(v.to(work), counts, longest)
    key_mean = key_rows.sum(-2) / counts[:, None].to(work)
    # Padding rows of key_rows turn nonzero here, but their value rows are zero, so they add nothing below.
    centred = key_rows - key_mean[..., None, :]
    moment_mean = centred.flatten(2, 3).transpose(-1, -2) @ value_rows.flatten(2, 3) / k.shape[2]
    moments = centred.transpose(-1, -2) @ value_rows if with_moments else None
    return _BlockStats(counts, longest, key_mean, value_rows.sum(-2), moment_mean, moments)


def _routing_bias(k: torch.Tensor, stats: _BlockStats, bias: str) -> torch.Tensor:
    """``(B, H, M)``: the routing bias of each key block (see :func:`pisa_attention`)."""
    if bias == "key_variance":
        key_rows, inside = _block_rows(k.to(stats.key_mean.dtype), stats.counts, stats.longest)
        centred = (key_rows - stats.key_mean[..., None, :]) * inside[..., None]
        variance = centred.square().sum((-1, -2)) / stats.counts.to(centred.dtype)
        return torch.log(variance.clamp_min(_VARIANCE_BIAS_EPS))
    moments = stats.moments
    if bias == "centered":  # H̄ per key token times Nk / M: the mean of the H_j over blocks
        moments = moments - stats.moment_mean[:, :, None] * (k.shape[2] / stats.counts.numel())
    return torch.log(moments.flatten(-2).norm(dim=-1) + _MOMENT_BIAS_EPS)


@torch.no_grad()
def _route(
    q: torch.Tensor, k: torch.Tensor, query_counts: tuple[torch.Tensor, int], stats: _BlockStats, scale: float,
    num_selected: int, *, bias: str | None, sink: str | None,
) -> torch.Tensor:
    """``(B, H, M, k)`` int64: each query block's top-k key blocks, by descending score, ties to the lower id.
    ``query_counts``: the query blocks' sizes (on q's device) and the largest of them."""
    score = scale * _block_mean(q, *query_counts) @ stats.key_mean.transpose(-1, -2)
    if bias is not None:
        score = score + _routing_bias(k, stats, bias)[:, :, None, :]
    if sink is not None:
        score[..., 0 if sink == "first" else -1] = float("inf")
    # A stable descending sort keeps equal scores in ascending block order (torch.topk does not promise that).
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :num_selected]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_counts: torch.Tensor, stats: _BlockStats,
    blocks: torch.Tensor, scale: float, order: str,
) -> torch.Tensor:
    """``(B, H, N, Dv)`` in q's dtype, in block order: the spec's ``num / den`` for every query token."""
    B, H, N, _ = q.shape
    num_keys, num_blocks = k.shape[2], stats.counts.numel()
    selected = torch.zeros(B, H, query_counts.numel(), num_blocks, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, blocks, True)
    # output_size: the counts sum to N and Nk, which meta and fake tensors cannot compute.
    query_block = torch.repeat_interleave(torch.arange(query_counts.numel(), device=q.device), query_counts,
                                          output_size=N)
    key_block = torch.repeat_interleave(torch.arange(num_blocks, device=q.device), stats.counts, output_size=num_keys)
    keys = torch.cat([k, stats.key_mean.to(k.dtype)], dim=2)
    values = torch.cat([v, (stats.value_sum / stats.counts[:, None]).to(v.dtype)], dim=2)
    work = stats.key_mean.dtype
    bias = torch.cat([torch.zeros(num_keys, dtype=work, device=q.device), torch.log(stats.counts.to(work))])
    outputs = []
    for start in range(0, N, _QUERY_CHUNK):
        rows = selected[:, :, query_block[start : start + _QUERY_CHUNK]]  # (B, H, chunk, M)
        allowed = torch.cat([rows[..., key_block], ~rows], dim=-1)
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
    centroid_probs = probs[..., keys.shape[2] - stats.counts.numel():]  # n_j e^{c_j − m} / den, 0 on selected blocks
    query = q.to(work)
    if order == "hybrid":
        first = centroid_probs.sum(-1, keepdim=True) * (query @ stats.moment_mean)
    else:
        first = torch.einsum("bhtm,bhtd,bhmde->bhte", centroid_probs / stats.counts.to(work), query, stats.moments)
    return out + scale * first
