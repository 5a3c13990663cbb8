"""LLSA given a selection, with each fine query block's keys gathered as the paper lists them: a twin whose memory
grows with N times the keys per query (512 at N = 65,536, block 16, top-8), where the torch reference's dense mask
and its autograd graph grow with N² (about 200 GB in float64 at 65,536 tokens). Shared by the GPU test at that
length and the tier-0 test that checks this twin against the reference."""

from __future__ import annotations

import torch


def _children_means(x: torch.Tensor, block_size: int, levels: int) -> list[torch.Tensor]:
    """Levels 1..``levels`` of ``x (B, H, N, C)``, the default pooling: a level-l token is the plain mean of its
    (up to ``block_size``) level-(l−1) tokens, averaged in float32 (float64 for float64) and returned in x's dtype."""
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    means = []
    for _ in range(levels):
        B, H, n, C = work.shape
        groups = -(-n // block_size)
        sums = torch.nn.functional.pad(work, (0, 0, 0, groups * block_size - n)).view(B, H, groups, block_size, C)
        sizes = (n - torch.arange(groups, device=x.device) * block_size).clamp(max=block_size)
        work = sums.sum(3) / sizes[:, None].to(work.dtype)
        means.append(work.to(x.dtype))
    return means


def gathered_llsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: list[torch.Tensor], block_size: int,
                  scale: float) -> torch.Tensor:
    """``(B, H, N, Dv)``: every query of fine block j attends, in one softmax with logits ``s·q·k + ln(count)``, to
    the tokens of the blocks ``I_1[j]``, at each level l = 1 … L−1 the children of ``I_{l+1}`` of the parent of the
    level-l token holding block j, and every level-L token; pooled tokens are the means of their children (the
    default ``coarse_pooling="children"``). Sequence order (no grid); matmuls in the input dtype,
    the softmax in float32 (float64 for float64), as the reference does."""
    B, H, N, D = q.shape
    b, L = block_size, len(indices)
    sizes = [N]
    for _ in range(L):
        sizes.append(-(-sizes[-1] // b))
    blocks = sizes[1]
    batch = torch.arange(B, device=q.device)[:, None, None, None]
    head = torch.arange(H, device=q.device)[None, :, None, None]
    children = torch.arange(b, device=q.device)
    key_sets = [(0, (indices[0][..., None] * b + children).flatten(-2))]  # (B, H, blocks, K_1·b) fine tokens
    for level in range(1, L):
        holder = torch.arange(blocks, device=q.device) // b ** (level - 1)  # level-l token holding block j
        chosen = indices[level][:, :, holder // b]  # its parent's choices, (B, H, blocks, K_{l+1})
        key_sets.append((level, (chosen[..., None] * b + children).flatten(-2)))
    key_sets.append((L, torch.arange(sizes[L], device=q.device).expand(B, H, blocks, sizes[L])))
    soft = torch.float64 if q.dtype == torch.float64 else torch.float32
    queries = torch.nn.functional.pad(q, (0, 0, 0, blocks * b - N)).view(B, H, blocks, b, D)
    logits, values = [], []
    pooled_keys, pooled_values = _children_means(k, b, L), _children_means(v, b, L)
    for level, ids in key_sets:
        # The logit bias ln(count): how many fine tokens the level-`level` token covers.
        counts = (N - torch.arange(sizes[level], device=q.device) * b**level).clamp(max=b**level)
        keys, vals = (k, v) if level == 0 else (pooled_keys[level - 1], pooled_values[level - 1])
        inside = ids < sizes[level]
        ids = ids.clamp(max=sizes[level] - 1)
        s = (queries @ keys[batch, head, ids].transpose(-1, -2)).to(soft) * scale
        s = s + counts[ids].to(soft).log()[..., None, :]
        logits.append(s.masked_fill(~inside[..., None, :], float("-inf")))
        values.append(vals[batch, head, ids])
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1).to(v.dtype)
    out = probs @ torch.cat(values, dim=-2)  # (B, H, blocks, b, Dv)
    return out.reshape(B, H, blocks * b, -1)[:, :, :N]
