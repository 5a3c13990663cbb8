"""LLSA's data-dependent plan, built with torch ops on the tensors' device: the pooled pyramid, the hierarchical
top-K selection and the block lists the kernels walk.

Numbering the kernels share. Pooled tokens of levels 1..L are concatenated, ``[level 1 | ... | level L]``
(``P = n_1 + ... + n_L`` rows). A *key block* is ``b`` consecutive tokens of one level, the children of one coarser
token: fine block ``p`` is rows ``[p*b, (p+1)*b)`` of k; pooled blocks are numbered level by level and pooled block
``p`` is rows ``[pb_offsets[p], pb_offsets[p+1])`` of the pooled tokens. Level-l block ``p`` holds the children of
level-(l+1) token ``p``, so "the candidates ``C_l`` of a query" are exactly the level-l blocks ``I_{l+1}[parent]``.

For fine query block j the kernels attend to ``fine[j]`` (the ``K_1`` blocks ``I_1[j]``) and ``pooled[j]``: for every
intermediate level l the blocks ``I_{l+1}[j // b**l]``, then every level-L block. The key side of the backward
uses the transpose of ``fine`` (CSR: counts, prefix sum, fill) and, for pooled keys, *items*: (query range, pooled
block) pairs whose partial gradients are summed per pooled token.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._options import llsa_level_sizes


@dataclass(frozen=True)
class Layout:
    """Sizes of one LLSA problem: ``N`` tokens, blocks of ``b``, ``L = len(topks)`` levels; the pooling rule
    (``children``: a level-l token is the plain mean of its level-(l−1) children, else of the fine tokens under it)
    and the pooled tokens' weights (``token_weight``: one per level, or None for their counts)."""

    num_tokens: int
    block_size: int
    topks: tuple[int, ...]
    children: bool = True
    token_weight: tuple[float, ...] | None = None

    @property
    def levels(self) -> int:
        return len(self.topks)

    @property
    def sizes(self) -> list[int]:
        """``[n_0 = N, n_1, ..., n_L]``."""
        return llsa_level_sizes(self.num_tokens, self.block_size, self.levels)

    @property
    def num_blocks(self) -> int:
        """Fine blocks ``n_1`` (= fine query blocks)."""
        return self.sizes[1]

    @property
    def pooled_tokens(self) -> int:
        return sum(self.sizes[1:])

    def level_blocks(self, level: int) -> int:
        """Key blocks of level ``level`` (``ceil(n_l / b)``)."""
        return -(-self.sizes[level] // self.block_size)

    def block_offset(self, level: int) -> int:
        """Id of the first pooled block of level ``level`` (1-based levels)."""
        return sum(self.level_blocks(lv) for lv in range(1, level))

    def token_offset(self, level: int) -> int:
        """Row of the first level-``level`` token among the pooled tokens."""
        return sum(self.sizes[1:level])

    @property
    def pooled_blocks_per_query(self) -> int:
        return sum(self.topks[1:]) + self.level_blocks(self.levels)


def counts(num_tokens: int, block_size: int, level: int, device) -> torch.Tensor:
    """``(n_level,)`` int64: fine tokens under each level-``level`` token."""
    span = block_size**level
    starts = torch.arange(0, num_tokens, span, device=device)
    return torch.clamp(num_tokens - starts, max=span)


def _sum_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    B, H, n, C = x.shape
    groups = -(-n // block_size)
    if groups * block_size != n:
        x = F.pad(x, (0, 0, 0, groups * block_size - n))
    return x.reshape(B, H, groups, block_size, C).sum(3)


def pyramid(x: torch.Tensor, block_size: int, levels: int, children: bool) -> list[torch.Tensor]:
    """Levels 1..L of ``x`` in float32 (float64 for float64), exactly as the reference computes them: with
    ``children`` each token the mean of its level-(l−1) children, else of all fine tokens under it (sums pooled
    level by level, divided by the count)."""
    level_x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    sums, out = level_x, []
    for level in range(1, levels + 1):
        if children:
            level_x = _sum_pool(level_x, block_size) / counts(level_x.shape[2], block_size, 1, x.device)[:, None]
        else:
            sums = _sum_pool(sums, block_size)
            level_x = sums / counts(x.shape[2], block_size, level, x.device)[:, None].to(sums.dtype)
        out.append(level_x)
    return out


def pooled(levels: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(B, H, P, C)`` in ``dtype``: the pyramid's levels concatenated (differentiable)."""
    return torch.cat(levels, dim=2).to(dtype)


def unpool(grads: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The mean-pool backward: ``(B, H, P, C)`` gradients of the pooled tokens to ``(B, H, N, C)`` (float32). Pooling
    tokens, each fine token gets, at every level, its ancestor's gradient over that ancestor's count; pooling
    children, each level-(l−1) token gets its parent's gradient (its own plus what came from above) over the
    parent's number of children, level by level down."""
    b, sizes, spread = layout.block_size, layout.sizes, None
    for level in range(layout.levels, 0, -1):
        start, size = layout.token_offset(level), sizes[level]
        part = grads[:, :, start : start + size].float()
        if not layout.children:
            part = part / counts(layout.num_tokens, b, level, grads.device)[:, None]
        if spread is not None:
            part = part + spread.repeat_interleave(b, dim=2)[:, :, :size]
        if layout.children:
            part = part / counts(sizes[level - 1], b, 1, grads.device)[:, None]
        spread = part
    return spread.repeat_interleave(b, dim=2)[:, :, : layout.num_tokens]


def pooled_blocks(layout: Layout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``pb_offsets`` (int32, pooled blocks + 1) and ``pbias`` (float32, ``log2`` of each pooled token's weight: its
    count, or the layout's ``token_weight`` of its level).

    Cached per layout and device in eager mode: besides saving the work, it keeps ``torch.log2`` off the hot path,
    where MKL's vector log opens an OpenMP region whose spinning workers then compete with the kernels' threads
    (about 10% of the CPU forward at 2 threads)."""
    if torch.compiler.is_compiling():
        return _pooled_blocks(layout, device)
    return _cached_pooled_blocks(layout, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_pooled_blocks(layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _pooled_blocks(layout, device)


def _pooled_blocks(layout: Layout, device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = [torch.arange(0, layout.sizes[lv], layout.block_size, device=device) + layout.token_offset(lv)
              for lv in range(1, layout.levels + 1)]
    end = torch.full((1,), layout.pooled_tokens, device=device, dtype=torch.int64)
    offsets = torch.cat(starts + [end]).to(torch.int32)
    per_level = [counts(layout.num_tokens, layout.block_size, lv, device).to(torch.float32)
                 for lv in range(1, layout.levels + 1)]
    if layout.token_weight is not None:
        per_level = [torch.full_like(c, w) for c, w in zip(per_level, layout.token_weight)]
    return offsets, torch.log2(torch.cat(per_level))


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` largest scores, by descending score, ties to the lower position (as a stable
    descending sort would give them).

    float32 scores become exact int64 keys, ``(order-preserving int32 image of the score) * 2**32 + (n - 1 - pos)``,
    all distinct, so a plain top-k is exact; other dtypes take the stable sort."""
    if scores.dtype != torch.float32:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    n = scores.shape[-1]
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, which compares equal to it
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # flips the magnitude bits of negatives: int order = float order
    key = order.to(torch.int64) * (1 << 32) + (n - 1 - torch.arange(n, device=scores.device))
    return torch.topk(key, count, dim=-1, sorted=True).indices


def _refine(queries: torch.Tensor, keys: torch.Tensor, parents: torch.Tensor, block_size: int,
            count: int) -> torch.Tensor:
    """``I_l`` ``(B, H, n_l, count)``: for each level-l query, the best of the children of its parent's choices.

    Candidates are listed by ascending id (the parents sorted, then their children), so breaking ties towards the
    lower position breaks them towards the lower id, as the reference does."""
    B, H, n, D = queries.shape
    n_par = parents.shape[2]
    kids = (parents.sort(dim=-1).values[..., None] * block_size
            + torch.arange(block_size, device=parents.device)).flatten(-2)  # (B, H, n_par, K*b)
    valid = kids < n
    heads = torch.arange(B * H, device=kids.device).view(B, H, 1, 1) * n
    rows = (heads + kids.clamp(max=n - 1)).flatten()
    cand_keys = keys.reshape(B * H * n, D).index_select(0, rows).view(B, H, n_par, kids.shape[-1], D)
    if n_par * block_size != n:
        queries = F.pad(queries, (0, 0, 0, n_par * block_size - n))
    siblings = queries.view(B, H, n_par, block_size, D)
    scores = (siblings @ cand_keys.transpose(-1, -2)).masked_fill(~valid[:, :, :, None, :], float("-inf"))
    best = _top(scores, count)  # (B, H, n_par, b, count) positions among the candidates
    chosen = torch.gather(kids[:, :, :, None, :].expand(-1, -1, -1, block_size, -1), -1, best)
    return chosen.reshape(B, H, n_par * block_size, count)[:, :, :n]


@torch.no_grad()
def select(queries: list[torch.Tensor], keys: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """``[I_1, ..., I_L]`` (int64, ``I_l`` of shape ``(B, H, n_l, K_l)``, ids by descending score) from the pyramids
    of q and k: top-K of the raw dot products, dense at level L, over the children of the parent's choices below."""
    queries, keys = [x.detach() for x in queries], [x.detach() for x in keys]
    indices = [_top(queries[-1] @ keys[-1].transpose(-1, -2), layout.topks[-1])]
    for level in range(layout.levels - 1, 0, -1):
        indices.insert(0, _refine(queries[level - 1], keys[level - 1], indices[0], layout.block_size,
                                  layout.topks[level - 1]))
    return indices


def block_lists(indices: list[torch.Tensor], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """``fine (B, H, n_1, K_1)`` and ``pooled (B, H, n_1, E)`` int32 key-block ids of every fine query block."""
    B, H, n1, _ = indices[0].shape
    device = indices[0].device
    j = torch.arange(n1, device=device)
    parts = [indices[lv][:, :, j // layout.block_size**lv] + layout.block_offset(lv) for lv in range(1, layout.levels)]
    last = torch.arange(layout.level_blocks(layout.levels), device=device) + layout.block_offset(layout.levels)
    parts.append(last.expand(B, H, n1, -1))
    return indices[0].to(torch.int32).contiguous(), torch.cat(parts, dim=-1).to(torch.int32).contiguous()


def transpose(fine: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR transpose of ``fine`` per ``(b, h)``: ``indptr (B*H, n_1 + 1)`` and ``indices (B*H, n_1*K_1)`` int32, the
    query blocks that chose each fine key block, in increasing order (counts, prefix sum, fill by a stable sort)."""
    flat = fine.reshape(-1, fine.shape[2] * fine.shape[3]).long()
    counts_ = torch.zeros(flat.shape[0], num_blocks, dtype=torch.int64, device=fine.device)
    counts_.scatter_add_(1, flat, torch.ones_like(flat))
    indptr = F.pad(torch.cumsum(counts_, dim=1), (1, 0))
    order = torch.sort(flat, dim=1, stable=True).indices
    return indptr.to(torch.int32).contiguous(), (order // fine.shape[3]).to(torch.int32).contiguous()


def level_chunk(layout: Layout) -> int:
    """Queries per item at level L: at least 1024 and ``n_L``, so the items' partial sums (``N / chunk`` copies of
    the level-L tokens) stay below the size of k."""
    chunk = max(1024, layout.sizes[-1])
    return -(-chunk // 64) * 64


def pooled_items(pooled_ids: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-side work on pooled keys: ``ranges (I, 2)`` int32 ``[q_start, q_end)`` and ``blocks (B*H, I)`` int32.

    Level l < L: one item per entry of ``I_{l+1}`` (queries under level-(l+1) token j' × one chosen block); level L:
    one item per (chunk of queries, level-L block)."""
    B, H = pooled_ids.shape[:2]
    device = pooled_ids.device
    N, b = layout.num_tokens, layout.block_size
    ranges, blocks, column = [], [], 0
    for level in range(1, layout.levels):
        parents, kk = layout.sizes[level + 1], layout.topks[level]
        start = torch.arange(parents, device=device) * b ** (level + 1)
        ranges.append(torch.stack([start, torch.clamp(start + b ** (level + 1), max=N)], 1).repeat_interleave(kk, 0))
        first_child = torch.arange(parents, device=device) * b**level
        blocks.append(pooled_ids[:, :, first_child, column : column + kk].reshape(B, H, -1))
        column += kk
    chunk, last = level_chunk(layout), layout.level_blocks(layout.levels)
    start = torch.arange(0, N, chunk, device=device)
    ranges.append(torch.stack([start, torch.clamp(start + chunk, max=N)], 1).repeat_interleave(last, 0))
    ids = (torch.arange(last, device=device) + layout.block_offset(layout.levels)).repeat(start.numel())
    blocks.append(ids.expand(B, H, -1))
    return (torch.cat(ranges).to(torch.int32).contiguous(),
            torch.cat(blocks, dim=-1).reshape(B * H, -1).to(torch.int32).contiguous())
