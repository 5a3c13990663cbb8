"""Triton kernels of PISA (``specs/pisa.md``): one fused forward for the exact blocks, the centroids and the
first-order term, and the backward in three kernels.

Forward, one program per (query block, batch·head): an online softmax over the tokens of the selected key blocks,
then over every other block's centroid (key ``k̄_j``, logit ``+ log2 n_j``, value ``w_j = V̂_j / n_j``) in chunks,
with the running ``z = Σ e^{c_j - m}`` of the first-order term rescaled with everything else whenever the max rises.
``out = (acc + scale·z·(q·H̄)) / den``; ``lse`` and ``zeta = z / den`` are stored for the backward.

Backward (``Δ = rowsum(dout·out)``, ``ρ = scale·(q·H̄)·dout``; exact ``dℓ = P(dout·v − Δ)``, centroid
``dc = P(dout·w + ρ/n − Δ)``): dq per query block; dk, dv per key block over the query blocks that selected it (the
selection's transpose, per batch·head); dk̄, dw per chunk of centroids over a split of the query blocks, the splits
summed afterwards. No output is written by two programs, so nothing needs atomics.

Rows are gathered through the block permutation (int64 offsets), every load and store is masked (ragged blocks,
head dims that are not powers of two), softmax runs in base 2 with fp32 state.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Centroids per chunk of the centroid phase (the tests lower it to cover several chunks on tiny shapes).
CENTROID_CHUNK = 64


@triton.jit
def _gather(ptr, base, rows, stride_n, o_c, stride_c, m_r, m_c):
    """``(len(rows), len(o_c))`` block of a (N, C) slice at ``base``; zeros outside the masks."""
    return tl.load(ptr + base + rows[:, None] * stride_n + o_c[None, :] * stride_c, mask=m_r[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _centroid_bias(off_ptr, sel_ptr, sel_base, o_c, M):
    """Per centroid of the chunk: ``(open, log2 n_j or -inf, 1/n_j or 0)``; open = exists and not selected."""
    m_c = o_c < M
    selected = tl.load(sel_ptr + sel_base + o_c, mask=m_c, other=1)
    n_c = (tl.load(off_ptr + o_c + 1, mask=m_c, other=1) - tl.load(off_ptr + o_c, mask=m_c, other=0)).to(tl.float32)
    is_open = m_c & (selected == 0)
    bias = tl.where(is_open, tl.log2(n_c), float("-inf"))
    weight = tl.where(is_open, 1.0 / n_c, 0.0)
    return is_open, bias, weight


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
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * 1.4426950408889634
    q_start = tl.load(off_ptr + i_q)
    q_len = tl.load(off_ptr + i_q + 1) - q_start
    o_m = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    m_q = o_m < q_len
    q_rows = tl.load(perm_ptr + q_start + o_m, mask=m_q, other=0).to(tl.int64)
    b_q = _gather(q_ptr, i_b * stride_qb + i_h * stride_qh, q_rows, stride_qn, o_d, stride_qd, m_q, m_d)
    k_base = i_b * stride_kb + i_h * stride_kh
    v_base = i_b * stride_vb + i_h * stride_vh

    b_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK], dtype=tl.float32)
    b_z = tl.zeros([BLOCK], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    row = i_bh * M + i_q
    for e in range(0, NUM_SEL):
        j = tl.load(blocks_ptr + row * NUM_SEL + e)
        k_start = tl.load(off_ptr + j)
        m_k = o_m < tl.load(off_ptr + j + 1) - k_start
        k_rows = tl.load(perm_ptr + k_start + o_m, mask=m_k, other=0).to(tl.int64)
        b_kt = tl.trans(_gather(k_ptr, k_base, k_rows, stride_kn, o_d, stride_kd, m_k, m_d))
        b_v = _gather(v_ptr, v_base, k_rows, stride_vn, o_dv, stride_vd, m_k, m_dv)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
        b_s = tl.where(m_q[:, None] & m_k[None, :], b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(b_p, 1)
        b_z = b_z * alpha
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_m = m_new

    cent_base = i_bh * M
    for c0 in range(0, M, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        is_open, bias, weight = _centroid_bias(off_ptr, sel_ptr, row * M, o_c, M)
        if tl.sum(is_open.to(tl.int32)) > 0:
            m_c = o_c < M
            b_kmt = tl.trans(_gather(km_ptr, cent_base * D, o_c, D, o_d, 1, m_c, m_d)).to(b_q.dtype)
            b_w = _gather(vm_ptr, cent_base * DV, o_c, DV, o_dv, 1, m_c, m_dv).to(b_q.dtype)
            b_s = tl.dot(b_q, b_kmt, input_precision=PRECISION) * qk_scale + bias[None, :]
            m_new = tl.maximum(b_m, tl.max(b_s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(b_m - m_safe)
            b_p = tl.exp2(b_s - m_safe[:, None])
            b_l = b_l * alpha + tl.sum(b_p, 1)
            b_z = b_z * alpha + tl.sum(b_p * weight[None, :], 1)
            b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_w.dtype), b_w, input_precision=PRECISION)
            b_m = m_new

    has_key = b_l > 0.0
    inv_l = 1.0 / tl.where(has_key, b_l, 1.0)
    o_base = i_bh * N * DV
    if HYBRID:
        b_first = _gather(first_ptr, o_base, q_rows, DV, o_dv, 1, m_q, m_dv)
        b_acc += (scale * b_z)[:, None] * b_first
    b_out = b_acc * inv_l[:, None]
    tl.store(out_ptr + o_base + q_rows[:, None] * DV + o_dv[None, :], b_out.to(out_ptr.dtype.element_ty),
             mask=m_q[:, None] & m_dv[None, :])
    lse = tl.where(has_key, (b_m + tl.log2(tl.where(has_key, b_l, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + i_bh * N + q_rows, lse, mask=m_q)
    tl.store(zeta_ptr + i_bh * N + q_rows, b_z * inv_l, mask=m_q)


@triton.jit
def _load_query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
                     stride_qb, stride_qh, stride_qn, stride_qd, o_m, o_d, o_dv, HYBRID: tl.constexpr):
    """Query block ``i_q``: rows, mask, q, dout, lse (base 2), delta, rho (0 without the first-order term)."""
    q_start = tl.load(off_ptr + i_q)
    m_q = o_m < tl.load(off_ptr + i_q + 1) - q_start
    q_rows = tl.load(perm_ptr + q_start + o_m, mask=m_q, other=0).to(tl.int64)
    b_q = _gather(q_ptr, i_b * stride_qb + i_h * stride_qh, q_rows, stride_qn, o_d, stride_qd, m_q, o_d < D)
    b_do = _gather(do_ptr, i_bh * N * DV, q_rows, DV, o_dv, 1, m_q, o_dv < DV)
    row_ptr = i_bh * N + q_rows
    b_lse = tl.load(lse_ptr + row_ptr, mask=m_q, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta_ptr + row_ptr, mask=m_q, other=0.0)
    if HYBRID:
        b_rho = tl.load(rho_ptr + row_ptr, mask=m_q, other=0.0)
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
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * 1.4426950408889634
    o_m = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    q_rows, m_q, b_q, b_do, b_lse, b_delta, b_rho = _load_query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
        stride_qb, stride_qh, stride_qn, stride_qd, o_m, o_d, o_dv, HYBRID)
    k_base = i_b * stride_kb + i_h * stride_kh
    v_base = i_b * stride_vb + i_h * stride_vh
    b_dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    row = i_bh * M + i_q
    for e in range(0, NUM_SEL):
        j = tl.load(blocks_ptr + row * NUM_SEL + e)
        k_start = tl.load(off_ptr + j)
        m_k = o_m < tl.load(off_ptr + j + 1) - k_start
        k_rows = tl.load(perm_ptr + k_start + o_m, mask=m_k, other=0).to(tl.int64)
        b_k = _gather(k_ptr, k_base, k_rows, stride_kn, o_d, stride_kd, m_k, m_d)
        b_vt = tl.trans(_gather(v_ptr, v_base, k_rows, stride_vn, o_dv, stride_vd, m_k, m_dv))
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_p = tl.where(m_q[:, None] & m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    cent_base = i_bh * M
    for c0 in range(0, M, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        is_open, bias, weight = _centroid_bias(off_ptr, sel_ptr, row * M, o_c, M)
        if tl.sum(is_open.to(tl.int32)) > 0:
            m_c = o_c < M
            b_km = _gather(km_ptr, cent_base * D, o_c, D, o_d, 1, m_c, m_d).to(b_q.dtype)
            b_wt = tl.trans(_gather(vm_ptr, cent_base * DV, o_c, DV, o_dv, 1, m_c, m_dv)).to(b_do.dtype)
            b_s = tl.dot(b_q, tl.trans(b_km), input_precision=PRECISION) * qk_scale + bias[None, :]
            b_p = tl.where(m_q[:, None], tl.exp2(b_s - b_lse[:, None]), 0.0)
            b_dp = tl.dot(b_do, b_wt, input_precision=PRECISION)
            b_dc = b_p * (b_dp + b_rho[:, None] * weight[None, :] - b_delta[:, None])
            b_dq += tl.dot(b_dc.to(b_km.dtype), b_km, input_precision=PRECISION)
    tl.store(dq_ptr + (i_bh * N + q_rows[:, None]) * D + o_d[None, :], (b_dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m_q[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["N", "M", "NUM_SEL"])
def _pisa_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, dk_ptr, dv_ptr,
    perm_ptr, off_ptr, t_indptr_ptr, t_indices_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    N, M, NUM_SEL, H, D, DV, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * 1.4426950408889634
    o_n = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    k_start = tl.load(off_ptr + i_k)
    m_k = o_n < tl.load(off_ptr + i_k + 1) - k_start
    k_rows = tl.load(perm_ptr + k_start + o_n, mask=m_k, other=0).to(tl.int64)
    b_k = _gather(k_ptr, i_b * stride_kb + i_h * stride_kh, k_rows, stride_kn, o_d, stride_kd, m_k, m_d)
    b_v = _gather(v_ptr, i_b * stride_vb + i_h * stride_vh, k_rows, stride_vn, o_dv, stride_vd, m_k, m_dv)
    b_dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    t_row = t_indptr_ptr + i_bh * (M + 1) + i_k
    for e in range(tl.load(t_row), tl.load(t_row + 1)):
        i_q = tl.load(t_indices_ptr + i_bh * M * NUM_SEL + e)
        q_rows, m_q, b_q, b_do, b_lse, b_delta, b_rho = _load_query_side(
            q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
            stride_qb, stride_qh, stride_qn, stride_qd, o_n, o_d, o_dv, False)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # (keys, queries)
        b_pt = tl.where(m_k[:, None] & m_q[None, :], tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    base = i_bh * N
    tl.store(dk_ptr + (base + k_rows[:, None]) * D + o_d[None, :], (b_dk * scale).to(dk_ptr.dtype.element_ty),
             mask=m_k[:, None] & m_d[None, :])
    tl.store(dv_ptr + (base + k_rows[:, None]) * DV + o_dv[None, :], b_dv.to(dv_ptr.dtype.element_ty),
             mask=m_k[:, None] & m_dv[None, :])


@triton.jit(do_not_specialize=["N", "M", "NUM_SEL", "SPLITS"])
def _pisa_bwd_centroid_kernel(
    q_ptr, km_ptr, vm_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, dkm_ptr, dvm_ptr,
    perm_ptr, off_ptr, sel_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    N, M, NUM_SEL, H, D, DV, scale, SPLITS,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HYBRID: tl.constexpr, PRECISION: tl.constexpr,
):
    i_chunk = tl.program_id(0) // SPLITS
    i_split = tl.program_id(0) % SPLITS
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * 1.4426950408889634
    o_m = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    o_c = i_chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < M
    # The centroids only feed dots: keep them in the input dtype (half the registers of fp32).
    b_km = _gather(km_ptr, i_bh * M * D, o_c, D, o_d, 1, m_c, m_d).to(q_ptr.dtype.element_ty)
    b_w = _gather(vm_ptr, i_bh * M * DV, o_c, DV, o_dv, 1, m_c, m_dv).to(do_ptr.dtype.element_ty)
    b_dkm = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    b_dw = tl.zeros([BLOCK_C, BLOCK_DV], dtype=tl.float32)
    for i_q in range(M * i_split // SPLITS, M * (i_split + 1) // SPLITS):
        is_open, bias, weight = _centroid_bias(off_ptr, sel_ptr, (i_bh * M + i_q) * M, o_c, M)
        if tl.sum(is_open.to(tl.int32)) > 0:
            q_rows, m_q, b_q, b_do, b_lse, b_delta, b_rho = _load_query_side(
                q_ptr, do_ptr, lse_ptr, delta_ptr, rho_ptr, perm_ptr, off_ptr, i_q, i_b, i_h, i_bh, N, D, DV,
                stride_qb, stride_qh, stride_qn, stride_qd, o_m, o_d, o_dv, HYBRID)
            b_st = tl.dot(b_km, tl.trans(b_q), input_precision=PRECISION) * qk_scale + bias[:, None]
            b_pt = tl.where(m_q[None, :], tl.exp2(b_st - b_lse[None, :]), 0.0)  # (centroids, queries)
            b_dpt = tl.dot(b_w, tl.trans(b_do), input_precision=PRECISION)
            b_dct = b_pt * (b_dpt + weight[:, None] * b_rho[None, :] - b_delta[None, :])
            b_dkm += tl.dot(b_dct.to(b_q.dtype), b_q, input_precision=PRECISION)
            b_dw += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    part = i_split * (tl.num_programs(1).to(tl.int64) * M) + i_bh * M
    tl.store(dkm_ptr + (part + o_c[:, None]) * D + o_d[None, :], b_dkm * scale, mask=m_c[:, None] & m_d[None, :])
    tl.store(dvm_ptr + (part + o_c[:, None]) * DV + o_dv[None, :], b_dw, mask=m_c[:, None] & m_dv[None, :])


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
        q, k, v, key_mean.contiguous(), value_mean.contiguous(), first, out, lse, zeta,
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
    key_mean, value_mean = key_mean.contiguous(), value_mean.contiguous()
    grad = dout.float()
    delta = (grad * out.float()).sum(-1)
    hybrid = moment_mean is not None
    if hybrid:
        rho = scale * ((q.float() @ moment_mean) * grad).sum(-1)
    # dq in fp32 when the first-order term adds to it below (one rounding to q's dtype at the end).
    dq = torch.empty(B, H, N, D, dtype=torch.float32 if hybrid else q.dtype, device=q.device)
    dk = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    meta = _meta(q, v, max_block)
    common = (*_strides(q, k, v), N, M, K, H, D, DV, scale)
    mask = selection_mask(blocks)
    chunk = _chunk(M)
    rho_arg = rho if hybrid else delta
    _pisa_bwd_dq_kernel[(M, B * H)](
        q, k, v, key_mean, value_mean, dout, lse, delta, rho_arg, dq, perm, offsets, blocks, mask, *common,
        BLOCK_C=chunk, HYBRID=hybrid, **meta,
    )
    t_indptr, t_indices = transposed_selection(blocks)
    _pisa_bwd_dkv_kernel[(M, B * H)](
        q, k, v, dout, lse, delta, rho_arg, dk, dv, perm, offsets, t_indptr, t_indices, *common,
        **meta,
    )
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
