"""LLSA in plain torch: hierarchical top-K block selection plus coarse-token KV enrichment (Zhou et al., "Trainable
Log-linear Sparse Attention for Efficient Diffusion Transformers", arXiv 2512.16615).

The attention is one masked softmax per query over the concatenation of every level's tokens
``[fine (N) | level 1 (n_1) | ... | level L (n_L)]``, with ``ln(weight)`` added to the logits of pooled tokens
(their counts, or the given per-level ``token_weight``). Each fine query block allows: the fine tokens of its
selected blocks, the candidate tokens of its ancestor at every intermediate level, and all level-L tokens. No
de-duplication, as in the spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_qkv, resolve_scale
from .._options import check_llsa_indices, llsa_config, llsa_level_sizes, llsa_pooling, llsa_token_weight
from ..grid import TokenGrid, check_grid
from ._dense import masked_attention
from .ordering import inverse_permutation, zorder_permutation


def llsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 16,
    topk: int | tuple[int, ...] = 8,
    levels: int | None = None,
    grid: TokenGrid | None = None,
    return_indices: bool = False,
    scale: float | None = None,
    coarse_pooling: str = "children",
    token_weight: float | tuple[float, ...] | None = None,
    indices: list[torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """LLSA attention with ``L`` levels of mean-pooled tokens (``b = block_size`` children each).

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``.
        topk: keys kept per query block at every level, or ``(K_1, ..., K_L)``.
        levels: L, default the smallest L >= 1 with ``N / b**L <= 256``.
        grid: a :class:`~difattn.TokenGrid`; image tokens are then Z-ordered per frame, text stays at its end.
        coarse_pooling: ``"children"``: level-l token j is the plain mean of its level-(l−1) children
            ``[j*b, (j+1)*b)`` (the authors' rule); ``"tokens"``: the mean of the ``count = min(b**l, N − j*b**l)``
            fine tokens under it (its children weighted by their counts). They differ only when a level's last
            token is short (N not a multiple of ``b**(l−1)``), from level 2 on.
        token_weight: the weight of every level-l token in the softmax (logit ``+ ln w_l``): one positive float for
            every level or ``(w_1, ..., w_L)``; None (default) uses each token's count, ``min(b**l, N − j*b**l)``.
        indices: ``[I_1, ..., I_L]`` to use instead of the selection, ``I_l`` int64 ``(B, H, n_l, K_l)``.

    ``n_l = ceil(N / b**l)``. Selection (raw dot products of pooled q and k, not differentiated): ``I_L`` = top-K_L
    of all level-L keys; ``I_l`` = top-K_l among the children of the parent's ``I_{l+1}``; ties go to the lower id.
    Each fine query block attends in one softmax, logit ``s·q·k + ln(weight)``, to the fine tokens of its ``I_1``
    blocks, the candidates of its ancestor at every intermediate level and all level-L tokens; gradients flow to
    fine and pooled tokens.

    Returns ``(B, H, N, Dv)`` in q's dtype and the original token order; with ``return_indices=True`` also
    ``[I_1, ..., I_L]``: absolute level-l ids by descending score, in the internal (Z-ordered) numbering.
    """
    B, H, N, D, Dv = check_qkv(q, k, v)
    num_levels, topks = llsa_config(N, block_size, topk, levels)
    check_bool("return_indices", return_indices)
    children = llsa_pooling(coarse_pooling) == "children"
    weights = llsa_token_weight(token_weight, num_levels)
    if grid is not None:
        check_grid(grid, N)
    scale = resolve_scale(scale, D)
    perm = None if grid is None else zorder_permutation(grid).to(q.device)
    if perm is not None:
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    pooled_keys = _pyramid(k, block_size, num_levels, children)
    if indices is None:
        indices = _select(_pyramid(q.detach(), block_size, num_levels, children), pooled_keys, block_size, topks)
    else:
        sizes = llsa_level_sizes(N, block_size, num_levels)
        indices = check_llsa_indices(indices, [(B, H, sizes[lv], kk) for lv, kk in enumerate(topks, 1)], q.device)
    out = _attend(q, k, v, pooled_keys, indices, block_size, scale, children, weights)
    if perm is not None:
        out = out[:, :, inverse_permutation(perm)]
    return (out, indices) if return_indices else out


def _counts(num_tokens: int, block_size: int, level: int, device: torch.device) -> torch.Tensor:
    """``(n_level,)`` int64: fine tokens under each level-``level`` token (1 at level 0)."""
    span = block_size**level
    starts = torch.arange(0, num_tokens, span, device=device)
    return torch.clamp(num_tokens - starts, max=span)


def _sum_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, H, ceil(n/b), C)``: sums of ``b`` consecutive rows of ``x`` ``(B, H, n, C)``, the last over what it has."""
    B, H, n, C = x.shape
    groups = -(-n // block_size)
    return F.pad(x, (0, 0, 0, groups * block_size - n)).reshape(B, H, groups, block_size, C).sum(3)


def _pyramid(x: torch.Tensor, block_size: int, num_levels: int, children: bool) -> list[torch.Tensor]:
    """Levels 1..L of ``x`` in float32 (float64 for float64 input). ``children``: level-l token j is the mean of its
    level-(l−1) tokens ``[j*b, (j+1)*b)`` clipped to ``n_{l−1}``; otherwise the mean of the fine tokens it covers,
    ``[j*b**l, (j+1)*b**l)`` clipped to N, so ``count * mean`` is their exact sum at every level."""
    level_x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    sums, pooled = level_x, []
    for level in range(1, num_levels + 1):
        if children:
            level_x = _sum_pool(level_x, block_size) / _counts(level_x.shape[2], block_size, 1, x.device)[:, None]
        else:
            sums = _sum_pool(sums, block_size)
            level_x = sums / _counts(x.shape[2], block_size, level, x.device)[:, None].to(sums.dtype)
        pooled.append(level_x)
    return pooled


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pooled_keys: list[torch.Tensor], indices: list[torch.Tensor],
    block_size: int, scale: float, children: bool, weights: tuple[float, ...] | None,
) -> torch.Tensor:
    """``(B, H, N, Dv)`` in q's dtype: one masked softmax per query over every level's tokens, ``+ ln(weight)``
    (the counts, or ``weights[l-1]`` for every level-l token)."""
    N, num_levels = q.shape[2], len(indices)
    work = pooled_keys[0].dtype
    keys = torch.cat([k] + [x.to(k.dtype) for x in pooled_keys], dim=2)
    values = torch.cat([v] + [x.to(v.dtype) for x in _pyramid(v, block_size, num_levels, children)], dim=2)
    token_weights = [_counts(N, block_size, level, q.device).to(work) for level in range(num_levels + 1)]
    if weights is not None:
        token_weights[1:] = [torch.full_like(w, weight) for w, weight in zip(token_weights[1:], weights)]
    bias = torch.log(torch.cat(token_weights))[None, :]  # (1, N_keys): the same row for every query
    sizes = llsa_level_sizes(N, block_size, num_levels)
    mask = _block_mask(indices, sizes, block_size)[:, :, torch.arange(N, device=q.device) // block_size]
    return masked_attention(q, keys, values, scale=scale, mask=mask, bias=bias)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Ids of the ``count`` largest scores along the last dim; a stable sort sends ties to the lower id."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]


def _candidate_mask(parent_choice: torch.Tensor, num_children: int, block_size: int) -> torch.Tensor:
    """``(B, H, n, n)`` bool over level-l tokens: ``[j, c]`` is True when c's parent is among ``I_{l+1}[j // b]``.

    ``parent_choice`` is ``I_{l+1}``, ``(B, H, n_{l+1}, K_{l+1})``; ``n = num_children`` level-l tokens.
    """
    B, H, num_parents, _ = parent_choice.shape
    chosen = torch.zeros(B, H, num_parents, num_parents, dtype=torch.bool, device=parent_choice.device)
    chosen.scatter_(-1, parent_choice, True)
    parent = torch.arange(num_children, device=parent_choice.device) // block_size
    return chosen[:, :, parent][..., parent]


@torch.no_grad()
def _select(
    queries: list[torch.Tensor], keys: list[torch.Tensor], block_size: int, topks: tuple[int, ...]
) -> list[torch.Tensor]:
    """``[I_1, ..., I_L]`` from pooled queries and keys of levels 1..L (raw dot products, no scale)."""
    indices = [_top(queries[-1] @ keys[-1].transpose(-1, -2), topks[-1])]
    for level in range(len(topks) - 1, 0, -1):
        scores = queries[level - 1] @ keys[level - 1].transpose(-1, -2)
        candidates = _candidate_mask(indices[0], scores.shape[-1], block_size)
        indices.insert(0, _top(scores.masked_fill(~candidates, float("-inf")), topks[level - 1]))
    return indices


def _block_mask(indices: list[torch.Tensor], sizes: list[int], block_size: int) -> torch.Tensor:
    """``(B, H, n_1, N + n_1 + ... + n_L)`` bool: the keys of each fine query block, over all levels' tokens."""
    B, H, num_blocks, _ = indices[0].shape
    device = indices[0].device
    fine_block = torch.arange(sizes[0], device=device) // block_size
    chosen = torch.zeros(B, H, num_blocks, num_blocks, dtype=torch.bool, device=device)
    parts = [chosen.scatter_(-1, indices[0], True)[..., fine_block]]
    for level in range(1, len(indices)):
        # The level-l ancestor of fine block j is j // b**(l-1); its candidates are the children of I_{l+1}.
        ancestor = torch.arange(num_blocks, device=device) // block_size ** (level - 1)
        parts.append(_candidate_mask(indices[level], sizes[level], block_size)[:, :, ancestor])
    parts.append(torch.ones(B, H, num_blocks, sizes[-1], dtype=torch.bool, device=device))
    return torch.cat(parts, dim=-1)
