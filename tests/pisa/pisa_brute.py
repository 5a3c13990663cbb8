"""Independent twins of PISA for the tests, written from the formulas of the spec and of the authors' released
kernels (never from difattn's code): the block layout, the statistics, the routing with each routing bias, and the
attention token by token (float64 loops; tiny shapes)."""

from __future__ import annotations

import math

import torch

from difattn.grid import TokenGrid

# Image tile (th, tw) of a block of b tokens, as the spec lists them (th = 2^floor(log2(b)/2), tw = b / th).
TILES = {2: (1, 2), 4: (2, 2), 8: (2, 4), 16: (4, 4), 64: (8, 8), 128: (8, 16)}


def brute_layout(grid: TokenGrid | None, num_tokens: int, block_size: int) -> list[list[int]]:
    """Blocks in the spec's numbering, each as the list of its tokens' positions in the original sequence."""
    if grid is None:
        return [list(range(s, min(s + block_size, num_tokens))) for s in range(0, num_tokens, block_size)]
    th, tw = TILES[block_size]
    text = list(grid.text_range)
    text_blocks = [text[s : s + block_size] for s in range(0, len(text), block_size)]
    start = grid.image_range.start
    image_blocks = [
        [start + (f * grid.height + y) * grid.width + x
         for y in range(ty, min(ty + th, grid.height)) for x in range(tx, min(tx + tw, grid.width))]
        for f in range(grid.frames) for ty in range(0, grid.height, th) for tx in range(0, grid.width, tw)
    ]
    return text_blocks + image_blocks if grid.text_position == "first" else image_blocks + text_blocks


def brute_stats(k, v, layout):
    """Per block: k̄_j, V̂_j, H_j (lists over blocks of one (batch, head) slice)."""
    key_mean = [k[idx].mean(0) for idx in layout]
    value_sum = [v[idx].sum(0) for idx in layout]
    moments = [sum(torch.outer(k[t] - key_mean[j], v[t]) for t in idx) for j, idx in enumerate(layout)]
    return key_mean, value_sum, moments


def brute_bias(k, layout, moments, key_mean, j, routing_bias) -> float:
    """The routing bias of key block j: the paper's centred moment norm, the released uncentred one, or the
    trainable variant's log key variance."""
    if routing_bias in (True, "centered"):
        return math.log(float(torch.linalg.norm(moments[j] - sum(moments) / len(layout))) + 1e-5)
    if routing_bias == "uncentered":
        return math.log(float(torch.linalg.norm(moments[j])) + 1e-5)
    if routing_bias == "key_variance":
        variance = sum(float((k[t] - key_mean[j]) @ (k[t] - key_mean[j])) for t in layout[j]) / len(layout[j])
        return math.log(max(variance, 1e-8))
    return 0.0


def brute_route(q, k, v, layout, scale, num_selected, routing_bias, sink, key_layout=None) -> list[list[int]]:
    """S_i for every query block i of one slice: sorted by descending score, ties to the lower j, sink first.
    ``key_layout``: the key blocks when they differ from the query blocks (cross-attention)."""
    key_layout = layout if key_layout is None else key_layout
    key_mean, _, moments = brute_stats(k, v, key_layout)
    num_blocks = len(key_layout)
    selections = []
    for idx in layout:
        query_mean = q[idx].mean(0)
        score = [float(scale * query_mean @ key_mean[j]) + brute_bias(k, key_layout, moments, key_mean, j, routing_bias)
                 for j in range(num_blocks)]
        ranked = sorted(range(num_blocks), key=lambda j: (-score[j], j))
        if sink is not None:
            forced = 0 if sink == "first" else num_blocks - 1
            ranked = [forced] + [j for j in ranked if j != forced]
        selections.append(ranked[:num_selected])
    return selections


def brute_pisa(q, k, v, layout, selection, scale, order, key_layout=None):
    """``(N, Dv)``: the spec's num / den for every query token of one slice, token by token, block by block. The
    hybrid order approximates an unselected block's first-order term ``s e^{c−m} q·H_j`` by ``s n_j e^{c−m}
    q·H̄`` with ``H̄ = (1/Nk) Σ_j H_j`` (the released kernels' weighting by token count)."""
    key_layout = layout if key_layout is None else key_layout
    key_mean, value_sum, moments = brute_stats(k, v, key_layout)
    per_token_moment = sum(moments) / k.shape[0]
    rows = {}
    for i, queries in enumerate(layout):
        exact = [u for j in selection[i] for u in key_layout[j]]
        others = [j for j in range(len(key_layout)) if j not in selection[i]]
        for t in queries:
            exact_logits = scale * (k[exact] @ q[t])
            centroid_logits = [scale * (key_mean[j] @ q[t]) for j in others]
            m = torch.cat([exact_logits] + [c[None] for c in centroid_logits]).max()
            den = torch.exp(exact_logits - m).sum()
            num = torch.exp(exact_logits - m) @ v[exact]
            for j, c in zip(others, centroid_logits):
                den = den + len(key_layout[j]) * torch.exp(c - m)
                num = num + torch.exp(c - m) * value_sum[j]
                if order == "hybrid":
                    num = num + scale * len(key_layout[j]) * torch.exp(c - m) * (q[t] @ per_token_moment)
                elif order == "first":
                    num = num + scale * torch.exp(c - m) * (q[t] @ moments[j])
            rows[t] = num / den
    return torch.stack([rows[t] for t in range(q.shape[0])])


def brute_pisa_batched(q, k, v, layout, blocks, scale, order, key_layout=None):
    """brute_pisa over every (batch, head) slice of ``(B, H, N, D)`` inputs, with the op's ``blocks``."""
    return torch.stack([
        torch.stack([brute_pisa(q[b, h], k[b, h], v[b, h], layout, blocks[b, h].tolist(), scale, order, key_layout)
                     for h in range(q.shape[1])])
        for b in range(q.shape[0])
    ])
