"""Brute force written literally from the CLEAR and GRAT papers' mask rules, one (query, key) pair at a time: the
independent twins the references are checked against (shared by tests/clear and tests/grat)."""

from __future__ import annotations

import torch

from difattn.grid import TokenGrid


def token_coords(grid: TokenGrid) -> list[tuple[int, int, int] | None]:
    """``(t, y, x)`` of every token from the layout rules (None for text), independent of ``TokenGrid.coords``."""
    first_image = grid.text_tokens if grid.text_position == "first" else 0
    plane = grid.height * grid.width
    coords = []
    for i in range(grid.num_tokens):
        j = i - first_image
        is_image = 0 <= j < grid.image_tokens
        coords.append((j // plane, j // grid.width % grid.height, j % grid.width) if is_image else None)
    return coords

def brute_clear_mask(grid: TokenGrid, r: float, rt: float | None) -> torch.Tensor:
    rt = grid.frames if rt is None else rt
    coords = token_coords(grid)

    def allowed(cq, ck) -> bool:
        if cq is None or ck is None:
            return True
        (tq, yq, xq), (tk, yk, xk) = cq, ck
        return (yq - yk) ** 2 + (xq - xk) ** 2 < r * r and abs(tq - tk) < rt

    return torch.tensor([[allowed(cq, ck) for ck in coords] for cq in coords])

def brute_grat_mask(grid, group, pattern, reach, text_mask=None) -> torch.Tensor:
    """``(B, N, N)`` (B = 1 without ``text_mask``)."""
    if group is None:
        group = (1, 16, 16) if grid.frames == 1 else (4, 8, 8)
    gt, gh, gw = (1, *group) if len(group) == 2 else group
    coords = token_coords(grid)
    first_text = grid.text_range.start
    valid = [[True] * grid.text_tokens] if text_mask is None else text_mask.tolist()

    def image_allowed(cq, ck) -> bool:
        da, dp, dq = abs(cq[0] // gt - ck[0] // gt), abs(cq[1] // gh - ck[1] // gh), abs(cq[2] // gw - ck[2] // gw)
        if pattern == "neighbors":
            return da <= reach and dp <= reach and dq <= reach
        if grid.frames == 1:
            return dp == 0 or dq == 0
        return da == 0 or dp == 0 or dq == 0

    def allowed(b, cq, j) -> bool:
        ck = coords[j]
        if ck is None:
            return valid[b][j - first_text]
        return cq is None or image_allowed(cq, ck)

    keys = range(grid.num_tokens)
    return torch.tensor([[[allowed(b, cq, j) for j in keys] for cq in coords] for b in range(len(valid))])

def brute_attention(q, k, v, allowed, scale, global_kv=None, grid=None) -> torch.Tensor:
    """Per query: softmax over exactly its allowed keys (``allowed`` is ``(B, N, N)``), plus the global keys for
    image queries."""
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    coords = token_coords(grid) if global_kv is not None else None
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            keys = allowed[b, i].nonzero().squeeze(1)
            k_i, v_i = k[b][:, keys], v[b][:, keys]  # (H, n, D), (H, n, Dv)
            if global_kv is not None and coords[i] is not None:
                k_i = torch.cat([k_i, global_kv[0][b]], dim=1)
                v_i = torch.cat([v_i, global_kv[1][b]], dim=1)
            weights = torch.softmax(scale * torch.einsum("hd,hnd->hn", q[b, :, i], k_i), dim=-1)
            out[b, :, i] = torch.einsum("hn,hnd->hd", weights, v_i)
    return out

def assert_float64_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-11, atol=1e-12)
