"""Triton kernels of PISA (piecewise sparse attention, Li et al., arXiv 2602.01077): one fused forward for the
exact blocks, the centroids and the first-order term, and the backward in three kernels.

Forward, one program per (query block, batch·head): an online softmax over the tokens of the selected key blocks
(the block engine's loop, :func:`.block_attention.attend_blocks`), then over every other block's centroid (key
``k̄_j``, logit ``+ log2 n_j``, value ``w_j = V̂_j / n_j``) in chunks, with the running ``z = Σ n_j e^{c_j - m}`` (the
centroids' share of the denominator) of the first-order term rescaled with everything else whenever the max rises.
``out = (acc + scale·z·(q·H̄)) / den``, ``H̄`` the mean moment per token (each unselected block's ``q·H_j`` taken as
``n_j q·H̄``); ``lse`` and ``zeta = z / den`` are stored for the backward.

Backward (``Δ = rowsum(dout·out)``, ``ρ = scale·(q·H̄)·dout``; exact ``dℓ = P(dout·v − Δ)``, centroid
``dc = P(dout·w + ρ − Δ)``): dq per query block (the engine's loop, then the centroids); dk, dv per key block
over the query blocks that selected it, on the block engine's dk/dv kernel with the selection's transpose per
batch·head; dk̄, dw per chunk of centroids over a split of the query blocks, the splits summed afterwards. No output
is written by two programs, so nothing needs atomics.

Rows are gathered through the block permutation (int64 offsets), every load and store is masked (ragged blocks,
head dims that are not powers of two), softmax runs in base 2 with fp32 state.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._common import (
    LOG2_E, block_rows, load_row_stats, load_rows, online_softmax_finish, online_softmax_step, store_rows,
)
from .block_attention import attend_blocks, dq_blocks, whole_block_dkv

# Centroids per chunk of the centroid phase (the tests lower it to cover several chunks on tiny shapes).
CENTROID_CHUNK = 64


@triton.jit
def _centroid_bias(off_ptr, p_sel, o_c, M):
    """Per centroid ``o_c`` of a chunk, for one query block (``p_sel``: its row of the selection mask):
    ``(open, log2 n_j or -inf)``; open = exists and not selected (a closed centroid's probability is 0)."""
    m_c = o_c < M
    b_sel = tl.load(p_sel + o_c, mask=m_c, other=1)
    b_n = (tl.load(off_ptr + o_c + 1, mask=m_c, other=1) - tl.load(off_ptr + o_c, mask=m_c, other=0)).to(tl.float32)
    m_open = m_c & (b_sel == 0)
    return m_open, tl.where(m_open, tl.log2(b_n), float("-inf"))


@triton.jit(do_not_specialize=["N", "M", "NUM_SEL"])
def _pisa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, first_ptr, out_ptr, lse_ptr, zeta_ptr,
    perm_ptr, off_ptr, blocks_ptr, sel_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    N, M, NUM_SEL, H, D, DV, scale,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HYBRID: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block of one batch·head: ``out``, ``lse`` and ``zeta`` of its ``BLOCK`` rows (contiguous
    ``(B, H, N, ·)``)."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * LOG2_E
    _, q_rows, m_q = block_rows(perm_ptr, off_ptr, i_q, BLOCK)
    b_q = load_rows(q_ptr + i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
    b_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    i_row = i_bh * M + i_q
    # The selected blocks, whole (no element masks), on the block engine's loop; the first-order sum z is still 0.
    b_m, b_l, b_acc = attend_blocks(
        b_q, b_m, b_l, b_acc, tl.arange(0, BLOCK), m_q, blocks_ptr + i_row * NUM_SEL, blocks_ptr, 0, NUM_SEL, perm_ptr, off_ptr,
        k_ptr + i_b * stride_kb + i_h * stride_kh, v_ptr + i_b * stride_vb + i_h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, D, DV, qk_scale,
        i_b, perm_ptr, 0, perm_ptr, 0, BLOCK, BLOCK_D, BLOCK_DV, False, False, PRECISION,
    )
    b_z = tl.zeros([BLOCK], dtype=tl.float32)
    for i_c in range(0, M, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_open, b_bias = _centroid_bias(off_ptr, sel_ptr + i_row * M, o_c, M)
        if tl.sum(m_open.to(tl.int32)) > 0:
            m_c = o_c < M
            b_km = load_rows(km_ptr + i_bh * M * D, o_c, m_c, D, 1, D, BLOCK_D)
            b_w = load_rows(vm_ptr + i_bh * M * DV, o_c, m_c, DV, 1, DV, BLOCK_DV)
            b_s = tl.dot(b_q, tl.trans(b_km), input_precision=PRECISION) * qk_scale + b_bias[None, :]
            b_m, b_l, b_acc, b_alpha, b_p = online_softmax_step(b_s, b_w, b_m, b_l, b_acc, PRECISION)
            b_z = b_z * b_alpha + tl.sum(b_p, 1)

    b_inv_l, b_lse = online_softmax_finish(b_m, b_l)
    o_out = i_bh * N * DV
    if HYBRID:
        b_acc += (scale * b_z)[:, None] * load_rows(first_ptr + o_out, q_rows, m_q, DV, 1, DV, BLOCK_DV)
    store_rows(out_ptr + o_out, q_rows, m_q, DV, DV, b_acc * b_inv_l[:, None], BLOCK_DV)
    tl.store(lse_ptr + i_bh * N + q_rows, b_lse, mask=m_q)
    tl.store(zeta_ptr + i_bh * N + q_rows, b_z * b_inv_l, mask=m_q)


@triton.jit
def _load_query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HYBRID: tl.constexpr):
    """Query block ``i_q``: rows, mask, q, dout, lse (base 2), delta, rho (0 without the first-order term)."""
    _, q_rows, m_q = block_rows(perm_ptr, off_ptr, i_q, BLOCK)
    b_q = load_rows(q_ptr + i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
    b_do = load_rows(do_ptr + i_bh * N * DV, q_rows, m_q, DV, 1, DV, BLOCK_DV)
    b_lse, b_delta = load_row_stats(lse_ptr + i_bh * N, delta_ptr + i_bh * N, q_rows, m_q)
    if HYBRID:
        b_rho = tl.load(rho_ptr + i_bh * N + q_rows, mask=m_q, other=0.0)
    else:
        b_rho = tl.zeros_like(b_delta)
    return q_rows, m_q, b_q, b_do, b_lse, b_delta, b_rho


@triton.jit(do_not_specialize=["N", "M", "NUM_SEL"])
def _pisa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, dq_ptr,
    perm_ptr, off_ptr, blocks_ptr, sel_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    N, M, NUM_SEL, H, D, DV, scale,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HYBRID: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dq`` of one query block of one batch·head: the exact part on the block engine's loop, then the
    centroids' ``dc = P(dout·w + ρ − Δ)``."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * LOG2_E
    q_rows, m_q, b_q, b_do, b_lse, b_delta, b_rho = _load_query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
        stride_qb, stride_qh, stride_qn, stride_qd, BLOCK, BLOCK_D, BLOCK_DV, HYBRID)
    i_row = i_bh * M + i_q
    b_dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    b_dq = dq_blocks(
        b_q, b_do, b_lse, b_delta, b_dq, tl.arange(0, BLOCK), m_q, blocks_ptr + i_row * NUM_SEL, blocks_ptr, 0, NUM_SEL,
        perm_ptr, off_ptr, k_ptr + i_b * stride_kb + i_h * stride_kh, v_ptr + i_b * stride_vb + i_h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, D, DV, qk_scale,
        i_b, perm_ptr, 0, perm_ptr, 0, BLOCK, BLOCK_D, BLOCK_DV, False, False, PRECISION,
    )
    for i_c in range(0, M, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_open, b_bias = _centroid_bias(off_ptr, sel_ptr + i_row * M, o_c, M)
        if tl.sum(m_open.to(tl.int32)) > 0:
            m_c = o_c < M
            b_km = load_rows(km_ptr + i_bh * M * D, o_c, m_c, D, 1, D, BLOCK_D)
            b_w = load_rows(vm_ptr + i_bh * M * DV, o_c, m_c, DV, 1, DV, BLOCK_DV)
            b_s = tl.dot(b_q, tl.trans(b_km), input_precision=PRECISION) * qk_scale + b_bias[None, :]
            b_p = tl.where(m_q[:, None], tl.exp2(b_s - b_lse[:, None]), 0.0)
            b_dp = tl.dot(b_do, tl.trans(b_w), input_precision=PRECISION)
            b_dc = b_p * (b_dp + b_rho[:, None] - b_delta[:, None])
            b_dq += tl.dot(b_dc.to(b_km.dtype), b_km, input_precision=PRECISION)
    store_rows(dq_ptr + i_bh * N * D, q_rows, m_q, D, D, b_dq * scale, BLOCK_D)


@triton.jit(do_not_specialize=["N", "M", "NUM_SEL", "SPLITS"])
def _pisa_bwd_centroid_kernel(
    q_ptr, km_ptr, vm_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, dkm_ptr, dvm_ptr,
    perm_ptr, off_ptr, sel_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    N, M, NUM_SEL, H, D, DV, scale, SPLITS,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HYBRID: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial ``dk̄ (BLOCK_C, D)``, ``dw (BLOCK_C, DV)`` of one chunk of centroids of one batch·head over one
    split of the query blocks (fp32 ``(SPLITS, B, H, M, ·)``, summed by the caller)."""
    i_chunk = tl.program_id(0) // SPLITS
    i_split = tl.program_id(0) % SPLITS
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * LOG2_E
    o_c = i_chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < M
    b_km = load_rows(km_ptr + i_bh * M * D, o_c, m_c, D, 1, D, BLOCK_D)
    b_w = load_rows(vm_ptr + i_bh * M * DV, o_c, m_c, DV, 1, DV, BLOCK_DV)
    b_dkm = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    b_dw = tl.zeros([BLOCK_C, BLOCK_DV], dtype=tl.float32)
    for i_q in range(M * i_split // SPLITS, M * (i_split + 1) // SPLITS):
        m_open, b_bias = _centroid_bias(off_ptr, sel_ptr + (i_bh * M + i_q) * M, o_c, M)
        if tl.sum(m_open.to(tl.int32)) > 0:
            _, m_q, b_q, b_do, b_lse, b_delta, b_rho = _load_query_side(
                q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
                stride_qb, stride_qh, stride_qn, stride_qd, BLOCK, BLOCK_D, BLOCK_DV, HYBRID)
            b_st = tl.dot(b_km, tl.trans(b_q), input_precision=PRECISION) * qk_scale + b_bias[:, None]
            b_pt = tl.where(m_q[None, :], tl.exp2(b_st - b_lse[None, :]), 0.0)  # (centroids, queries)
            b_dpt = tl.dot(b_w, tl.trans(b_do), input_precision=PRECISION)
            b_dct = b_pt * (b_dpt + b_rho[None, :] - b_delta[None, :])
            b_dkm += tl.dot(b_dct.to(b_q.dtype), b_q, input_precision=PRECISION)
            b_dw += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    o_part = (i_split * tl.num_programs(1).to(tl.int64) + i_bh) * M
    store_rows(dkm_ptr + o_part * D, o_c, m_c, D, D, b_dkm * scale, BLOCK_D)
    store_rows(dvm_ptr + o_part * DV, o_c, m_c, DV, DV, b_dw, BLOCK_DV)


# --- launchers -------------------------------------------------------------------------------------------------


def _meta(q, v, max_block: int) -> dict:
    import torch

    block_d, block_dv = (max(16, triton.next_power_of_2(x)) for x in (q.shape[3], v.shape[3]))
    return dict(
        BLOCK=max(16, triton.next_power_of_2(max_block)), BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if max(block_d, block_dv) >= 128 else 4,
    )


def _chunk(num_blocks: int) -> int:
    return max(16, min(CENTROID_CHUNK, triton.next_power_of_2(num_blocks)))


def selection_mask(blocks):
    """``(B·H, M, M)`` uint8: 1 where query block i selected key block j."""
    import torch

    B, H, M, K = blocks.shape
    mask = torch.zeros(B * H, M, M, dtype=torch.uint8, device=blocks.device)
    return mask.scatter_(2, blocks.reshape(B * H, M, K), 1)


def transposed_selection(blocks):
    """Per batch·head, for each key block the query blocks that selected it, ascending: ``(t_indptr (B·H, M+1),
    t_indices (B·H, M·k))`` int64."""
    import torch

    B, H, M, K = blocks.shape
    flat = blocks.reshape(B * H, M * K)
    order = torch.argsort(flat, dim=1, stable=True)  # by key block, then by entry (so by query block)
    counts = torch.zeros(B * H, M, dtype=torch.int64, device=blocks.device).scatter_add_(1, flat, torch.ones_like(flat))
    indptr = torch.cat([counts.new_zeros(B * H, 1), counts.cumsum(1)], dim=1)
    return indptr, (order // K).contiguous()


def _centroids(q, key_mean, value_mean):
    """The fp32 centroids in q's dtype, contiguous: they only feed matmuls, which take q's dtype (converted once
    here rather than in every program, inside its loop)."""
    return key_mean.to(q.dtype).contiguous(), value_mean.to(q.dtype).contiguous()


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def pisa_fwd(q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, scale: float, max_block: int):
    """Forward; ``key_mean (B, H, M, D)``, ``value_mean (B, H, M, Dv)``, ``moment_mean (B, H, D, Dv)`` (or None for the
    zeroth order) fp32, ``blocks (B, H, M, k)`` int64 contiguous. Returns ``out`` (q's dtype), ``lse``, ``zeta``
    (fp32)."""
    import torch

    B, H, N, D = q.shape
    M, K, DV = blocks.shape[2], blocks.shape[3], v.shape[3]
    out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    zeta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    hybrid = moment_mean is not None
    first = (q.float() @ moment_mean).contiguous() if hybrid else lse  # q·H̄ rows; any pointer when unused
    _pisa_fwd_kernel[(M, B * H)](
        q, k, v, *_centroids(q, key_mean, value_mean), first, out, lse, zeta,
        perm, offsets, blocks, selection_mask(blocks),
        *_strides(q, k, v), N, M, K, H, D, DV, scale,
        BLOCK_C=_chunk(M), HYBRID=hybrid, **_meta(q, v, max_block),
    )
    return out, lse, zeta


def _splits(device, work_items: int, num_blocks: int) -> int:
    """Query-block splits of the centroid pass: enough programs to fill the device (a few under the interpreter)."""
    import torch

    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4 if os.environ.get("TRITON_INTERPRET") == "1" else 1
    return max(1, min(num_blocks, -(-target // work_items)))


def pisa_bwd(q, k, v, key_mean, value_mean, moment_mean, out, dout, lse, zeta, perm, offsets, blocks, scale: float,
             max_block: int):
    """Backward: ``(dq, dk, dv)`` (contiguous, q's dtype; dk, dv of the exact entries) and ``(dkey_mean, dvalue_mean,
    dmoment_mean)`` (fp32; the last empty for the zeroth order). ``dout`` contiguous."""
    import torch

    B, H, N, D = q.shape
    M, K, DV = blocks.shape[2], blocks.shape[3], v.shape[3]
    key_mean, value_mean = _centroids(q, key_mean, value_mean)
    grad = dout.float()
    delta = (grad * out.float()).sum(-1)
    hybrid = moment_mean is not None
    if hybrid:
        rho = scale * ((q.float() @ moment_mean) * grad).sum(-1)
    # dq in fp32 when the first-order term adds to it below (one rounding to q's dtype at the end).
    dq = torch.empty(B, H, N, D, dtype=torch.float32 if hybrid else q.dtype, device=q.device)
    meta = _meta(q, v, max_block)
    common = (*_strides(q, k, v), N, M, K, H, D, DV, scale)
    mask = selection_mask(blocks)
    chunk = _chunk(M)
    rho_arg = rho if hybrid else delta
    _pisa_bwd_dq_kernel[(M, B * H)](
        q, k, v, key_mean, value_mean, dout, lse, delta, rho_arg, dq, perm, offsets, blocks, mask, *common,
        BLOCK_C=chunk, HYBRID=hybrid, **meta,
    )
    # The exact blocks' dk, dv on the block engine's kernel, over the selection's transpose.
    t_indptr, t_indices = transposed_selection(blocks)
    dk, dv = whole_block_dkv(q, k, v, dout, lse, delta, perm, offsets, t_indptr, t_indices, scale, meta["BLOCK"],
                             {key: value for key, value in meta.items() if key != "BLOCK"})
    chunks = -(-M // chunk)
    splits = _splits(q.device, chunks * B * H, M)
    dkm = torch.empty(splits, B, H, M, D, dtype=torch.float32, device=q.device)
    dvm = torch.empty(splits, B, H, M, DV, dtype=torch.float32, device=q.device)
    _pisa_bwd_centroid_kernel[(chunks * splits, B * H)](
        q, key_mean, value_mean, dout, lse, delta, rho_arg, dkm, dvm, perm, offsets, mask,
        *q.stride(), N, M, K, H, D, DV, scale, splits,
        BLOCK_C=chunk, HYBRID=hybrid, **meta,
    )
    if not hybrid:
        return dq, dk, dv, dkm.sum(0), dvm.sum(0), dkm.new_empty(0)
    # The first-order term s·ζ·q·H̄: dq += s ζ H̄ g, dH̄ = s Σ_t ζ_t q_t g_tᵀ.
    weighted = (scale * zeta)[..., None] * grad
    dq = (dq + weighted @ moment_mean.transpose(-1, -2)).to(q.dtype)
    dmoment_mean = q.float().transpose(-1, -2) @ weighted
    return dq, dk, dv, dkm.sum(0), dvm.sum(0), dmoment_mean
