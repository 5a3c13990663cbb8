"""Independent twins of LLSA for the tests, written from the spec and the authors' variable-length reference (never
from difattn's code): the Z-order, the pooled levels under either pooling rule, the hierarchical selection and the
attention token by token (float64 loops; tiny shapes)."""

from __future__ import annotations

import math

import torch

from difattn.grid import TokenGrid


def brute_zorder(grid: TokenGrid) -> list[int]:
    """Sequence positions in LLSA's internal order: per frame, image tokens by Morton code of (y, x)."""

    def morton(y: int, x: int) -> int:
        return sum((((x >> bit) & 1) << (2 * bit)) | (((y >> bit) & 1) << (2 * bit + 1)) for bit in range(16))

    plane = grid.height * grid.width
    image = sorted(range(grid.image_tokens),
                   key=lambda i: (i // plane, morton(i % plane // grid.width, i % grid.width)))
    order = list(range(grid.num_tokens))
    order[grid.image_range.start : grid.image_range.stop] = [grid.image_range.start + i for i in image]
    return order


def brute_levels(x: torch.Tensor, block_size: int, num_levels: int, pooling: str = "children") -> list[torch.Tensor]:
    """``[x, level 1, ..., level L]`` of one ``(N, C)`` slice. ``"children"`` (the authors' rule): level-l token j
    is the plain mean of the level-(l−1) tokens ``[j*b, (j+1)*b)`` that exist; ``"tokens"``: the mean of the fine
    tokens ``[j*b**l, (j+1)*b**l)`` (so its count times its value is their sum, for ragged N too)."""
    levels = [x]
    for level in range(1, num_levels + 1):
        source, span = (levels[-1], block_size) if pooling == "children" else (x, block_size**level)
        levels.append(torch.stack([source[s : s + span].mean(0) for s in range(0, source.shape[0], span)]))
    return levels


def children(parents: list[int], block_size: int, num_children: int) -> list[int]:
    return [c for p in parents for c in range(p * block_size, min((p + 1) * block_size, num_children))]


def brute_select(q, k, block_size: int, topks: tuple[int, ...], pooling: str = "children") -> list[list[list[int]]]:
    """``[I_1, ..., I_L]`` of one slice as nested lists: top-K by raw dot product, ties to the lower id."""
    num_levels = len(topks)
    queries, keys = brute_levels(q, block_size, num_levels, pooling), brute_levels(k, block_size, num_levels, pooling)

    def best(level: int, j: int, candidates) -> list[int]:
        score = {c: float(queries[level][j] @ keys[level][c]) for c in candidates}
        return sorted(candidates, key=lambda c: (-score[c], c))[: topks[level - 1]]

    chosen = {num_levels: [best(num_levels, j, range(keys[num_levels].shape[0]))
                           for j in range(keys[num_levels].shape[0])]}
    for level in range(num_levels - 1, 0, -1):
        n = keys[level].shape[0]
        chosen[level] = [best(level, j, children(chosen[level + 1][j // block_size], block_size, n))
                         for j in range(n)]
    return [chosen[level] for level in range(1, num_levels + 1)]


def brute_llsa(q, k, v, block_size: int, indices: list[list[list[int]]], scale: float, pooling: str = "children",
               token_weight=None) -> torch.Tensor:
    """``(N, Dv)`` of one slice: for every query, the spec's key list (level, id, weight) and one softmax. A
    pooled token's weight is its count of fine tokens, or ``token_weight[l-1]`` at level l (the authors' kernels'
    per-level argument)."""
    num_tokens, num_levels = q.shape[0], len(indices)
    keys, values = brute_levels(k, block_size, num_levels, pooling), brute_levels(v, block_size, num_levels, pooling)
    rows = []
    for t in range(num_tokens):
        j = t // block_size
        entries = [(0, u) for c in indices[0][j] for u in range(c * block_size, min((c + 1) * block_size, num_tokens))]
        for level in range(1, num_levels):
            ancestor = j // block_size ** (level - 1)
            parents = indices[level][ancestor // block_size]
            entries += [(level, c) for c in children(parents, block_size, keys[level].shape[0])]
        entries += [(num_levels, c) for c in range(keys[num_levels].shape[0])]
        weights = [token_weight[level - 1] if token_weight is not None and level > 0
                   else min(block_size**level, num_tokens - c * block_size**level) for level, c in entries]
        logits = torch.stack([scale * (q[t] @ keys[level][c]) + math.log(w) for (level, c), w in zip(entries, weights)])
        probs = torch.softmax(logits, dim=0)
        rows.append(sum(p * values[level][c] for p, (level, c) in zip(probs, entries)))
    return torch.stack(rows)


def brute_llsa_batched(q, k, v, block_size, indices, scale, grid=None, pooling="children", token_weight=None):
    """brute_llsa over every (batch, head) slice of ``(B, H, N, D)`` inputs, Z-ordering and restoring with a grid."""
    order = list(range(q.shape[2])) if grid is None else brute_zorder(grid)
    restore = torch.argsort(torch.tensor(order))
    out = torch.stack([
        torch.stack([
            brute_llsa(q[b, h, order], k[b, h, order], v[b, h, order], block_size,
                       [ids[b, h].tolist() for ids in indices], scale, pooling, token_weight)
            for h in range(q.shape[1])
        ])
        for b in range(q.shape[0])
    ])
    return out[:, :, restore]
