"""PISA's block statistics and routing, the statistics as the custom op ``difattn::pisa_stats``.

One pass over the tokens gives ``k̄_j`` (key mean), ``w_j = V̂_j / n_j`` (value mean), ``q̄_j`` (query mean, for
routing) and, when asked, ``H̄ = (1/N) Σ_t (k_t − k̄_{j(t)}) v_tᵀ`` (the mean moment per token) by reduction (no
per-block ``H_j``) and the routing bias's statistic of each block: ``‖H_j − (N/M)·H̄‖_F`` (``"centered"``: the
moment's distance from the mean over blocks), ``‖H_j‖_F`` (``"uncentered"``) or ``(1/n_j) Σ_{t∈j} ‖k_t − k̄_j‖²``
(``"key_variance"``). On the rust backend the compiled core makes them in one parallel pass (no chain of small
torch ops before the attention kernel); on the triton backend plain torch ops on the tensors' device. The backward
(the compiled core on the rust backend, torch ops on the triton backend) carries ``dk̄``, ``dw`` and ``dH̄`` to
every token of their blocks::

    dk_t = dk̄_j / n_j + (1/N) dH̄ (v_t − w_j)        dv_t = dw_j / n_j + (1/N) dH̄ᵀ (k_t − k̄_j)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._native import core
from .._base.descriptors import tensor_desc
from .._base.registry import launcher, register
from .layout import PisaLayout

# ln(statistic + eps) for the moment biases, ln(max(statistic, eps)) for the key variance (as the reference).
MOMENT_BIAS_EPS = 1e-5
VARIANCE_BIAS_EPS = 1e-8
# Gram entries (B·H·blocks·b²) the torch path computes at once for the moment biases.
_GRAM_CHUNK = 1 << 24


def _work(x: torch.Tensor) -> torch.Tensor:
    """Statistics and routing run in fp32 (float64 inputs stay float64: the torch path serves tests too)."""
    return x if x.dtype == torch.float64 else x.float()


def block_rows(x: torch.Tensor, slots: torch.Tensor | None, num_blocks: int, max_block: int) -> torch.Tensor:
    """``(B, H, M, b_max, C)``: the rows of ``x`` ``(B, H, N, C)`` block by block, zeros in the padding."""
    B, H, N, C = x.shape
    if slots is None:
        return F.pad(x, (0, 0, 0, num_blocks * max_block - N)).view(B, H, num_blocks, max_block, C)
    return F.pad(x, (0, 0, 0, 1)).index_select(2, slots).view(B, H, num_blocks, max_block, C)


def _spread(centred, value_rows, moment_mean, centre: float, max_block: int) -> torch.Tensor:
    """``‖H_j − centre·H̄‖_F`` per block from Gram matrices: ``‖H_j‖² = Σ_{t,u∈j} (k̃_t·k̃_u)(v_t·v_u)``,
    ``⟨H_j, H̄⟩ = Σ_t k̃_t·(H̄ v_t)``; no ``(M, D, Dv)`` moments."""
    B, H = centred.shape[:2]
    step = max(1, _GRAM_CHUNK // (B * H * max_block * max_block))
    norm_sq = torch.cat([
        ((c @ c.transpose(-1, -2)) * (w @ w.transpose(-1, -2))).sum((-1, -2))
        for c, w in zip(centred.split(step, dim=2), value_rows.split(step, dim=2))
    ], dim=2)
    if centre == 0.0:
        return norm_sq.clamp_min(0).sqrt()
    cross = (centred * (value_rows @ moment_mean.transpose(-1, -2)[:, :, None])).sum((-1, -2))
    spread_sq = norm_sq - 2 * centre * cross + centre**2 * moment_mean.square().sum((-1, -2))[..., None]
    return spread_sq.clamp_min(0).sqrt()


def torch_stats(q, k, v, counts, slots, max_block: int, moments: bool, bias: str):
    """The statistics in plain torch ops (any device, float64 kept for float64 inputs); the op's outputs."""
    M, N = counts.numel(), k.shape[2]
    rows = lambda x: block_rows(_work(x), slots, M, max_block)  # noqa: E731
    key_rows, value_rows, query_rows = rows(k), rows(v), rows(q)
    n = counts.to(key_rows.dtype)[:, None]
    key_mean, value_mean, query_mean = key_rows.sum(-2) / n, value_rows.sum(-2) / n, query_rows.sum(-2) / n
    # Padding rows turn nonzero once centred, but their value rows are zero: they add nothing to the moments.
    centred = key_rows - key_mean[..., None, :]
    empty = lambda: key_mean.new_empty(0)  # noqa: E731  (a fresh one per output: outputs must not alias)
    moment_mean = centred.flatten(2, 3).transpose(-1, -2) @ value_rows.flatten(2, 3) / N if moments else empty()
    if bias == "key_variance":
        inside = (torch.arange(max_block, device=k.device) < counts[:, None])[..., None]
        statistic = (centred * inside).square().sum((-1, -2)) / n[:, 0]
    elif bias:
        statistic = _spread(centred, value_rows, moment_mean, N / M if bias == "centered" else 0.0, max_block)
    else:
        statistic = empty()
    return key_mean, value_mean, moment_mean, query_mean, statistic


@register("pisa_stats", "triton")
def _stats_torch(q, k, v, perm, offsets, slots, max_block: int, moments: bool, bias: str):
    """The statistics by torch ops on the tensors' device (what the triton backend runs)."""
    return tuple(x.contiguous() for x in torch_stats(q, k, v, offsets.diff(), slots, max_block, moments, bias))


@register("pisa_stats", "rust")
def _stats_rust(q, k, v, perm, offsets, slots, max_block: int, moments: bool, bias: str):
    """The statistics in one pass of the compiled core (CPU tensors)."""
    B, H, N, D = k.shape
    M, Dv = offsets.numel() - 1, v.shape[3]
    new = lambda *shape: torch.empty(shape, dtype=torch.float32, device=k.device)  # noqa: E731
    key_mean, value_mean, query_mean = new(B, H, M, D), new(B, H, M, Dv), new(B, H, M, D)
    moment_mean = new(B, H, D, Dv) if moments else new(0)
    statistic = new(B, H, M) if bias else new(0)
    spread = None
    if bias in ("centered", "uncentered"):
        spread = (tensor_desc(statistic), N / M if bias == "centered" else 0.0)
    perm, offsets = perm.contiguous(), offsets.contiguous()  # held until the core returns
    core().pisa_stats(
        tensor_desc(k), tensor_desc(v), tensor_desc(q), (tensor_desc(perm), tensor_desc(offsets)),
        tensor_desc(key_mean), tensor_desc(value_mean), tensor_desc(moment_mean) if moments else None,
        tensor_desc(query_mean), tensor_desc(statistic) if bias == "key_variance" else None, spread,
        torch.get_num_threads(),
    )
    return key_mean, value_mean, moment_mean, query_mean, statistic


@torch.library.custom_op("difattn::pisa_stats", mutates_args=())
def pisa_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor,
    block_of: torch.Tensor, slots: torch.Tensor | None, max_block: int, moments: bool, bias: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k̄ (B, H, M, D), w (B, H, M, Dv), H̄ (B, H, D, Dv), q̄ (B, H, M, D), statistic (B, H, M))``, fp32; ``H̄``
    is empty unless ``moments`` (needed by the ``"centered"`` bias), the routing-bias statistic unless ``bias``
    (``""`` or a routing bias name). Only ``k̄``, ``w`` and ``H̄`` are differentiable."""
    return launcher("pisa_stats", backend)(q, k, v, perm, offsets, slots, max_block, moments, bias)


@pisa_stats.register_fake
def _(q, k, v, perm, offsets, block_of, slots, max_block, moments, bias, backend):
    B, H, _, D = k.shape
    M, Dv = offsets.shape[0] - 1, v.shape[3]
    new = lambda *shape: k.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (new(B, H, M, D), new(B, H, M, Dv), new(B, H, D, Dv) if moments else new(0), new(B, H, M, D),
            new(B, H, M) if bias else new(0))


@torch.library.custom_op("difattn::pisa_stats_bwd", mutates_args=())
def pisa_stats_bwd(
    k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, key_mean: torch.Tensor,
    value_mean: torch.Tensor, dkey_mean: torch.Tensor | None, dvalue_mean: torch.Tensor | None,
    dmoment_mean: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dk, dv)`` like ``k``, ``v`` (contiguous) from the statistics' gradients (None adds nothing), in the compiled
    core (CPU tensors): the formula of the module docstring."""
    dk, dv = torch.empty(k.shape, dtype=k.dtype), torch.empty(v.shape, dtype=v.dtype)
    # The f32 contiguous gradients stay referenced here while the core reads them (a descriptor holds no reference).
    grads = [None if g is None else g.float().contiguous() for g in (dkey_mean, dvalue_mean, dmoment_mean)]
    perm, offsets = perm.contiguous(), offsets.contiguous()
    core().pisa_stats_backward(
        tensor_desc(k), tensor_desc(v), (tensor_desc(perm), tensor_desc(offsets)), tensor_desc(key_mean),
        tensor_desc(value_mean), *(None if g is None else tensor_desc(g) for g in grads), tensor_desc(dk),
        tensor_desc(dv), torch.get_num_threads(),
    )
    return dk, dv


@pisa_stats_bwd.register_fake
def _(k, v, perm, offsets, key_mean, value_mean, dkey_mean, dvalue_mean, dmoment_mean):
    return torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_stats(ctx, inputs, output):
    q, k, v, perm, offsets, block_of, slots, max_block, moments, bias, backend = inputs
    key_mean, value_mean = output[0], output[1]
    ctx.save_for_backward(k, v, key_mean, value_mean, perm, offsets, block_of)
    ctx.moments = moments
    ctx.backend = backend


def _stats_backward(ctx, dkey_mean, dvalue_mean, dmoment_mean, _dquery_mean, _dstatistic):
    k, v, key_mean, value_mean, perm, offsets, block_of = ctx.saved_tensors
    dmoment_mean = dmoment_mean if ctx.moments else None
    if ctx.backend == "rust":
        dk, dv = pisa_stats_bwd(k, v, perm, offsets, key_mean, value_mean, dkey_mean, dvalue_mean, dmoment_mean)
        return None, dk, dv, None, None, None, None, None, None, None, None
    counts = offsets.diff().to(key_mean.dtype)[:, None]
    dk = torch.zeros_like(k, dtype=key_mean.dtype) if dkey_mean is None else (dkey_mean / counts).index_select(2, block_of)
    dv = torch.zeros_like(v, dtype=key_mean.dtype) if dvalue_mean is None else (dvalue_mean / counts).index_select(2, block_of)
    if dmoment_mean is not None:
        inv_n = 1.0 / k.shape[2]
        dk = dk + (_work(v) - value_mean.index_select(2, block_of)) @ (dmoment_mean.transpose(-1, -2) * inv_n)
        dv = dv + (_work(k) - key_mean.index_select(2, block_of)) @ (dmoment_mean * inv_n)
    return None, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


pisa_stats.register_autograd(_stats_backward, setup_context=_setup_stats)


def block_stats(q, k, v, layout: PisaLayout, *, moments: bool, bias: str | None, backend: str):
    """:func:`pisa_stats` over ``layout``: ``(k̄, w, H̄ or None, q̄, routing-bias statistic or None)``; ``moments``
    is raised where the ``"centered"`` bias needs ``H̄``."""
    moments = moments or bias == "centered"
    key_mean, value_mean, moment_mean, query_mean, statistic = pisa_stats(
        q, k, v, layout.perm, layout.offsets, layout.block_of, layout.slots, layout.max_block, moments, bias or "",
        backend,
    )
    return key_mean, value_mean, moment_mean if moments else None, query_mean, statistic if bias else None


def score_bias(statistic: torch.Tensor, bias: str) -> torch.Tensor:
    """``(B, H, M)``: the routing bias from its statistic (:func:`pisa_stats`): ``ln(max(var, 1e-8))`` for the key
    variance, ``ln(norm + 1e-5)`` for the moment norms."""
    if bias == "key_variance":
        return torch.log(statistic.clamp_min(VARIANCE_BIAS_EPS))
    return torch.log(statistic + MOMENT_BIAS_EPS)


@torch.library.custom_op("difattn::pisa_top_blocks", mutates_args=())
def pisa_top_blocks(score: torch.Tensor, num_selected: int) -> torch.Tensor:
    """``(B, H, M, k)`` int64: the first ``k = num_selected`` ids of each row of ``score (B, H, M, Mk)`` (fp32, CPU)
    in stable descending order (ties to the lower id, NaN first), as :func:`torch.sort` gives them, by a partial
    selection in the compiled core instead of a full sort."""
    blocks = torch.empty(*score.shape[:3], num_selected, dtype=torch.int64)
    score = score.contiguous()  # held until the core returns
    core().pisa_top_blocks(tensor_desc(score), tensor_desc(blocks), torch.get_num_threads())
    return blocks


@pisa_top_blocks.register_fake
def _(score, num_selected):
    return score.new_empty(*score.shape[:3], num_selected, dtype=torch.int64)


@torch.no_grad()
def route(query_mean: torch.Tensor, key_mean: torch.Tensor, scale: float, num_selected: int, *, sink: str | None,
          bias: torch.Tensor | None = None, backend: str = "torch") -> torch.Tensor:
    """``(B, H, M, k)`` int64: each query block's top-k key blocks by descending score ``s q̄ k̄ᵀ`` (``+ bias``, ``(B, H,
    Mk)``), ties to the lower id (a stable sort), the sink forced first; the ``"rust"`` backend selects them in the
    compiled core (the same ids in the same order), the others by :func:`torch.sort`."""
    score = scale * query_mean @ key_mean.transpose(-1, -2)
    if bias is not None:
        score = score + bias[:, :, None, :]
    if sink is not None:
        score[..., 0 if sink == "first" else -1] = float("inf")
    if backend == "rust" and score.dtype == torch.float32:
        return pisa_top_blocks(score, num_selected)
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :num_selected].contiguous()
