"""Masked softmax attention in plain torch, chunked over queries to bound transient memory."""

from __future__ import annotations

import torch

# Queries per chunk: (B*H) * chunk * N scores live at once besides what autograd keeps.
_QUERY_CHUNK = 1024


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(scale * q kᵀ + bias, masked) v``.

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, H, Nk, D)``; v: ``(B, H, Nk, Dv)``.
        mask: bool broadcastable to ``(B, H, Nq, Nk)``, True where attention is allowed; every query must allow
            at least one key.
        bias: float broadcastable to ``(B, H, Nq, Nk)``, added to the logits (e.g. ``ln(weight)``).

    Returns ``(B, H, Nq, Dv)`` in q's dtype. Matmuls run in the input dtype; the softmax runs in float32 (or
    float64 for float64 inputs), as a plain low-precision implementation would.

    A non-finite ``v[j, c]`` reaches ``out[i, c]`` only for the queries ``i`` the mask allows to see key ``j`` (the
    contract of every method): the masked entries' exact zeros would spread it to the whole column (``0 · NaN``).
    """
    soft_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Where v has non-finite values: the product with those zeroed, and per (query, channel) whether an allowed key
    # holds one (those entries take the plain product, which carries it).
    # (Not while tracing: meta and compiled calls have no values to look at.)
    traced = v.device.type == "meta" or torch.compiler.is_compiling()
    nonfinite = None if mask is None or traced or bool(v.isfinite().all()) else ~v.isfinite()
    outputs = []
    for start in range(0, q.shape[2], _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, q.shape[2])
        logits = (q[:, :, start:stop] @ k.transpose(-1, -2)).to(soft_dtype) * scale
        if bias is not None:
            logits = logits + _rows(bias, start, stop, q.shape[2]).to(soft_dtype)
        if mask is not None:
            logits = logits.masked_fill(~_rows(mask, start, stop, q.shape[2]), float("-inf"))
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        outputs.append(probs @ v if nonfinite is None else _carry_nonfinite(probs, v, nonfinite, _rows(
            mask, start, stop, q.shape[2])))
    return torch.cat(outputs, dim=2).to(q.dtype)


def _carry_nonfinite(probs: torch.Tensor, v: torch.Tensor, nonfinite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` where only the queries the mask allows to see a non-finite ``v[j, c]`` see it: the product with
    those values zeroed, and for each (query, channel) that sees one the plain sum, computed over that query's row
    alone (so the gradients of the other queries never meet the value either: ``0 · NaN`` is NaN there too)."""
    sees = (mask.to(v.dtype) @ nonfinite.to(v.dtype) > 0).expand(*probs.shape[:-1], v.shape[-1])
    out = probs @ v.masked_fill(nonfinite, 0)
    b, h, i = sees.any(-1).nonzero(as_tuple=True)
    plain = (probs[b, h, i].unsqueeze(-2) @ v.expand(*probs.shape[:2], *v.shape[-2:])[b, h]).squeeze(-2)
    return out.index_put((b, h, i), torch.where(sees[b, h, i], plain, out[b, h, i]))


def _rows(x: torch.Tensor, start: int, stop: int, num_queries: int) -> torch.Tensor:
    """Query rows ``start:stop`` of a tensor broadcastable to ``(..., Nq, Nk)``."""
    return x[..., start:stop, :] if x.shape[-2] == num_queries else x


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Plain softmax attention (the exactness target of every method)."""
    return masked_attention(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale)
