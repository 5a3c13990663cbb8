"""Triton kernels of LLSA (log-linear sparse attention): forward and backward over a selection.

Keys come from two tensors: fine ``k, v (B, H, N, ·)`` (any strides) and pooled ``kp, vp (B, H, P, ·)``, whose
tokens carry a ``+log2(count)`` logit bias. A key block is ``BS`` consecutive tokens of one level; a key tile holds
``GROUP`` blocks, gathered by block id (``o // BS_PAD`` picks the block, ``o % BS_PAD`` the row in it), so blocks
smaller than 64 tokens still fill a tile. Programs:

- forward and dq: one per (fine query block, batch·head), over its fine and pooled blocks;
- fine dk/dv: one per (fine key block, batch·head), over the query blocks that chose it (the transposed selection);
- pooled dk/dv: one per (item, batch·head): an item is a query range and one pooled block; its partial gradients
  are summed per pooled token by the caller.

Query and key blocks are small (16 rows by default) and the tensor cores' M dimension wants 64 rows on sm_90
(wgmma): every product runs transposed where a block's rows would be M, so that M is a 64-row tile or the head dim
and the block's 16 rows are N (the state of the forward and dq is kept as ``(D, BS)``).

No output is written by two programs and nothing needs atomics. Every load is masked (ragged blocks, head dims that
are not powers of two), addressing is int64, softmax runs in base 2 with fp32 state.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    LOG2_E, load_row_stats, load_rows, load_tile_t, online_softmax_finish, online_softmax_step_t, store_rows,
)


@triton.jit
def _key_tile(sel_ptr, e0, count, o_g, o_w, BS, N, pb_off_ptr, POOLED: tl.constexpr):
    """Rows and mask of the key tile holding blocks ``sel[e0 : e0 + GROUP]`` (fine rows of k, or pooled rows)."""
    m_e = (e0 + o_g) < count
    o_blk = tl.load(sel_ptr + e0 + o_g, mask=m_e, other=0).to(tl.int64)
    if POOLED:
        o_start = tl.load(pb_off_ptr + o_blk, mask=m_e, other=0).to(tl.int64)
        o_end = tl.load(pb_off_ptr + o_blk + 1, mask=m_e, other=0).to(tl.int64)
        o_rows = o_start + o_w
        m_rows = m_e & (o_rows < o_end)
    else:
        o_rows = o_blk * BS + o_w
        m_rows = m_e & (o_w < BS) & (o_rows < N)
    return o_rows, m_rows


@triton.jit
def _fwd_pass(
    b_qt, b_m, b_l, b_acc_t, sel_ptr, count, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    pb_off_ptr, pbias_ptr, BS, N, D, DV, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BS_PAD: tl.constexpr,
    POOLED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax of a query block (``b_qt (BLOCK_D, BLOCK_M)``, state ``b_acc_t (BLOCK_DV, BLOCK_M)``) over
    ``count`` key blocks listed at ``sel_ptr``, on (keys, queries) tiles."""
    o_n = tl.arange(0, BLOCK_N)
    o_g = o_n // BS_PAD
    o_w = o_n % BS_PAD
    o_dv = tl.arange(0, BLOCK_DV)
    for e0 in range(0, count, BLOCK_N // BS_PAD):
        k_rows, m_k = _key_tile(sel_ptr, e0, count, o_g, o_w, BS, N, pb_off_ptr, POOLED)
        b_k = load_rows(k_base, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
        b_vt = load_tile_t(v_base, k_rows, o_dv, m_k, o_dv < DV, stride_vn, stride_vd)
        b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale
        if POOLED:
            b_st += tl.load(pbias_ptr + k_rows, mask=m_k, other=0.0)[:, None]
        b_st = tl.where(m_k[:, None], b_st, float("-inf"))
        b_m, b_l, b_acc_t = online_softmax_step_t(b_st, b_vt, b_m, b_l, b_acc_t, PRECISION)
    return b_m, b_l, b_acc_t


@triton.jit(do_not_specialize=["N", "NB", "K_POOLED"])
def _llsa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, out_ptr, lse_ptr, fine_ptr, pooled_ptr, pb_off_ptr, pbias_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
    N, NB, H, D, DV, BS, K_FINE, K_POOLED, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """One fine query block of one batch·head: ``out (BS, DV)`` and ``lse (BS,)`` over its fine, then its pooled
    key blocks."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * LOG2_E
    o_m = tl.arange(0, BLOCK_M)
    q_rows = i_q.to(tl.int64) * BS + o_m
    m_q = (o_m < BS) & (q_rows < N)
    o_d = tl.arange(0, BLOCK_D)
    b_qt = load_tile_t(q_ptr + i_b * stride_qb + i_h * stride_qh, q_rows, o_d, m_q, o_d < D, stride_qn, stride_qd)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc_t = tl.zeros([BLOCK_DV, BLOCK_M], dtype=tl.float32)
    row = i_bh * NB + i_q
    b_m, b_l, b_acc_t = _fwd_pass(
        b_qt, b_m, b_l, b_acc_t, fine_ptr + row * K_FINE, K_FINE,
        k_ptr + i_b * stride_kb + i_h * stride_kh, v_ptr + i_b * stride_vb + i_h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, pb_off_ptr, pbias_ptr, BS, N, D, DV, qk_scale,
        BLOCK_N, BLOCK_D, BLOCK_DV, BS_PAD, False, PRECISION,
    )
    b_m, b_l, b_acc_t = _fwd_pass(
        b_qt, b_m, b_l, b_acc_t, pooled_ptr + row * K_POOLED, K_POOLED,
        kp_ptr + i_b * stride_kpb + i_h * stride_kph, vp_ptr + i_b * stride_vpb + i_h * stride_vph,
        stride_kpn, stride_kpd, stride_vpn, stride_vpd, pb_off_ptr, pbias_ptr, BS, N, D, DV, qk_scale,
        BLOCK_N, BLOCK_D, BLOCK_DV, BS_PAD, True, PRECISION,
    )
    b_inv_l, b_lse = online_softmax_finish(b_m, b_l)
    store_rows(out_ptr + i_b * stride_ob + i_h * stride_oh, q_rows, m_q, stride_on, DV,
               tl.trans(b_acc_t * b_inv_l[None, :]), BLOCK_DV)
    tl.store(lse_ptr + i_b * stride_lb + i_h * stride_lh + q_rows, b_lse, mask=m_q)


@triton.jit
def _dq_pass(
    b_qt, b_dot, b_lse, b_delta, b_dqt, sel_ptr, count, k_base, v_base, stride_kn, stride_kd, stride_vn,
    stride_vd, pb_off_ptr, pbias_ptr, BS, N, D, DV, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BS_PAD: tl.constexpr,
    POOLED: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dqᵀ += kᵀ · dSᵀ`` of a query block (``b_qt (BLOCK_D, BLOCK_M)``, ``b_dot (BLOCK_DV, BLOCK_M)``, ``b_dqt``
    unscaled ``(BLOCK_D, BLOCK_M)``) over ``count`` key blocks listed at ``sel_ptr``."""
    o_n = tl.arange(0, BLOCK_N)
    o_g = o_n // BS_PAD
    o_w = o_n % BS_PAD
    for e0 in range(0, count, BLOCK_N // BS_PAD):
        k_rows, m_k = _key_tile(sel_ptr, e0, count, o_g, o_w, BS, N, pb_off_ptr, POOLED)
        b_k = load_rows(k_base, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
        b_v = load_rows(v_base, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
        b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale  # (keys, queries)
        if POOLED:
            b_st += tl.load(pbias_ptr + k_rows, mask=m_k, other=0.0)[:, None]
        b_pt = tl.where(m_k[:, None], tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dpt = tl.dot(b_v, b_dot, input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dqt += tl.dot(tl.trans(b_k), b_dst.to(b_k.dtype), input_precision=PRECISION)
    return b_dqt


@triton.jit(do_not_specialize=["N", "NB", "K_POOLED"])
def _llsa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    fine_ptr, pooled_ptr, pb_off_ptr, pbias_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    stride_dob, stride_doh, stride_don, stride_lb, stride_lh,
    N, NB, H, D, DV, BS, K_FINE, K_POOLED, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dq (BS, D)`` of one fine query block of one batch·head (contiguous ``(B, H, N, D)`` output)."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    qk_scale = scale * LOG2_E
    o_m = tl.arange(0, BLOCK_M)
    q_rows = i_q.to(tl.int64) * BS + o_m
    m_q = (o_m < BS) & (q_rows < N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_qt = load_tile_t(q_ptr + i_b * stride_qb + i_h * stride_qh, q_rows, o_d, m_q, o_d < D, stride_qn, stride_qd)
    b_dot = load_tile_t(do_ptr + i_b * stride_dob + i_h * stride_doh, q_rows, o_dv, m_q, o_dv < DV, stride_don, 1)
    o_l = i_b * stride_lb + i_h * stride_lh
    b_lse, b_delta = load_row_stats(lse_ptr + o_l, delta_ptr + o_l, q_rows, m_q)
    b_dqt = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
    row = i_bh * NB + i_q
    b_dqt = _dq_pass(
        b_qt, b_dot, b_lse, b_delta, b_dqt, fine_ptr + row * K_FINE, K_FINE,
        k_ptr + i_b * stride_kb + i_h * stride_kh, v_ptr + i_b * stride_vb + i_h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, pb_off_ptr, pbias_ptr, BS, N, D, DV, qk_scale,
        BLOCK_N, BLOCK_D, BLOCK_DV, BS_PAD, False, PRECISION,
    )
    b_dqt = _dq_pass(
        b_qt, b_dot, b_lse, b_delta, b_dqt, pooled_ptr + row * K_POOLED, K_POOLED,
        kp_ptr + i_b * stride_kpb + i_h * stride_kph, vp_ptr + i_b * stride_vpb + i_h * stride_vph,
        stride_kpn, stride_kpd, stride_vpn, stride_vpd, pb_off_ptr, pbias_ptr, BS, N, D, DV, qk_scale,
        BLOCK_N, BLOCK_D, BLOCK_DV, BS_PAD, True, PRECISION,
    )
    store_rows(dq_ptr + i_bh * N * D, q_rows, m_q, D, D, tl.trans(b_dqt * scale), BLOCK_D)


@triton.jit
def _dkv_step(
    b_kt, b_vt, b_dkt, b_dvt, b_bias, m_k, q_rows, m_q, q_base, do_base, lse_base, delta_base,
    stride_qn, stride_qd, stride_don, D, DV, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dvᵀ += doutᵀ P``, ``dkᵀ += qᵀ dS`` of a key block (``b_kt (BLOCK_D, BLOCK_K)``, ``b_vt``, and the
    accumulators ``b_dkt`` (unscaled), ``b_dvt``, transposed) against one tile of query rows."""
    b_q = load_rows(q_base, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
    b_do = load_rows(do_base, q_rows, m_q, stride_don, 1, DV, BLOCK_DV)
    b_lse, b_delta = load_row_stats(lse_base, delta_base, q_rows, m_q)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale + b_bias[None, :]  # (queries, keys)
    b_p = tl.where(m_q[:, None] & m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dvt += tl.dot(tl.trans(b_do), b_p.to(b_do.dtype), input_precision=PRECISION)
    b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dkt += tl.dot(tl.trans(b_q), b_ds.to(b_q.dtype), input_precision=PRECISION)
    return b_dkt, b_dvt


@triton.jit(do_not_specialize=["N", "NB"])
def _llsa_bwd_fine_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, t_indptr_ptr, t_indices_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_lb, stride_lh,
    N, NB, H, D, DV, BS, K_FINE, scale,
    BLOCK_K: tl.constexpr, BLOCK_MQ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dk (BS, D)``, ``dv (BS, DV)`` through one fine key block of one batch·head, over the query blocks that
    chose it (fp32 contiguous ``(B, H, N, ·)`` outputs)."""
    i_k = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_n = tl.arange(0, BLOCK_K)
    k_rows = i_k.to(tl.int64) * BS + o_n
    m_k = (o_n < BS) & (k_rows < N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_kt = load_tile_t(k_ptr + i_b * stride_kb + i_h * stride_kh, k_rows, o_d, m_k, o_d < D, stride_kn, stride_kd)
    b_vt = load_tile_t(v_ptr + i_b * stride_vb + i_h * stride_vh, k_rows, o_dv, m_k, o_dv < DV, stride_vn,
                       stride_vd)
    b_bias = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_dkt = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    b_dvt = tl.zeros([BLOCK_DV, BLOCK_K], dtype=tl.float32)
    o_m = tl.arange(0, BLOCK_MQ)
    o_g = o_m // BS_PAD
    o_w = o_m % BS_PAD
    t_start = tl.load(t_indptr_ptr + i_bh * (NB + 1) + i_k)
    t_end = tl.load(t_indptr_ptr + i_bh * (NB + 1) + i_k + 1)
    choosers = t_indices_ptr + i_bh * NB * K_FINE
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh
    l_off = i_b * stride_lb + i_h * stride_lh
    qk_scale = scale * LOG2_E
    for e0 in range(t_start, t_end, BLOCK_MQ // BS_PAD):
        m_e = (e0 + o_g) < t_end
        o_blk = tl.load(choosers + e0 + o_g, mask=m_e, other=0).to(tl.int64)
        q_rows = o_blk * BS + o_w
        m_q = m_e & (o_w < BS) & (q_rows < N)
        b_dkt, b_dvt = _dkv_step(b_kt, b_vt, b_dkt, b_dvt, b_bias, m_k, q_rows, m_q, q_base, do_base, lse_ptr + l_off,
                                 delta_ptr + l_off, stride_qn, stride_qd, stride_don, D, DV, qk_scale,
                                 BLOCK_D, BLOCK_DV, PRECISION)
    store_rows(dk_ptr + i_bh * N * D, k_rows, m_k, D, D, tl.trans(b_dkt * scale), BLOCK_D)
    store_rows(dv_ptr + i_bh * N * DV, k_rows, m_k, DV, DV, tl.trans(b_dvt), BLOCK_DV)


@triton.jit(do_not_specialize=["N", "NI"])
def _llsa_bwd_pooled_dkv_kernel(
    q_ptr, kp_ptr, vp_ptr, do_ptr, lse_ptr, delta_ptr, part_k_ptr, part_v_ptr, ranges_ptr, blocks_ptr,
    pb_off_ptr, pbias_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    stride_dob, stride_doh, stride_don, stride_lb, stride_lh,
    N, NI, H, D, DV, BS, scale,
    BLOCK_K: tl.constexpr, BLOCK_MQ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial ``dk, dv (BS, ·)`` of one item (a query range and one pooled block) of one batch·head, fp32
    ``(B·H, NI, BS, ·)``; the caller sums them per pooled token."""
    i_item = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_blk = tl.load(blocks_ptr + i_bh * NI + i_item).to(tl.int64)
    i_start = tl.load(pb_off_ptr + i_blk).to(tl.int64)
    i_end = tl.load(pb_off_ptr + i_blk + 1).to(tl.int64)
    o_n = tl.arange(0, BLOCK_K)
    k_rows = i_start + o_n
    m_k = k_rows < i_end
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_kt = load_tile_t(kp_ptr + i_b * stride_kpb + i_h * stride_kph, k_rows, o_d, m_k, o_d < D, stride_kpn,
                       stride_kpd)
    b_vt = load_tile_t(vp_ptr + i_b * stride_vpb + i_h * stride_vph, k_rows, o_dv, m_k, o_dv < DV, stride_vpn,
                       stride_vpd)
    b_bias = tl.load(pbias_ptr + k_rows, mask=m_k, other=0.0)
    b_dkt = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    b_dvt = tl.zeros([BLOCK_DV, BLOCK_K], dtype=tl.float32)
    q_start = tl.load(ranges_ptr + 2 * i_item).to(tl.int64)
    q_end = tl.load(ranges_ptr + 2 * i_item + 1).to(tl.int64)
    o_m = tl.arange(0, BLOCK_MQ)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh
    l_off = i_b * stride_lb + i_h * stride_lh
    qk_scale = scale * LOG2_E
    for q0 in range(q_start, q_end, BLOCK_MQ):
        q_rows = q0 + o_m
        m_q = q_rows < q_end
        b_dkt, b_dvt = _dkv_step(b_kt, b_vt, b_dkt, b_dvt, b_bias, m_k, q_rows, m_q, q_base, do_base, lse_ptr + l_off,
                                 delta_ptr + l_off, stride_qn, stride_qd, stride_don, D, DV, qk_scale,
                                 BLOCK_D, BLOCK_DV, PRECISION)
    # Partial rows (B*H, NI, BS, ·): rows past the block's end stay zero and are dropped by the caller.
    o_slot = (i_bh * NI + i_item) * BS + o_n
    store_rows(part_k_ptr, o_slot, o_n < BS, D, D, tl.trans(b_dkt * scale), BLOCK_D)
    store_rows(part_v_ptr, o_slot, o_n < BS, DV, DV, tl.trans(b_dvt), BLOCK_DV)


# --- launchers -------------------------------------------------------------------------------------------------


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def _meta(q, v, block_size: int) -> dict:
    bs_pad = triton.next_power_of_2(block_size)
    return dict(
        BLOCK_D=_pow2(q.shape[3]), BLOCK_DV=_pow2(v.shape[3]), BS_PAD=bs_pad,
        PRECISION="ieee" if q.dtype.itemsize == 4 else "tf32",
    )


def _tile(q, block_d: int) -> int:
    """Rows per streamed tile: 64, fewer for wide rows (fp32 at D = 128 and up) so shared memory stays well within
    a GPU's limit."""
    row_bytes = block_d * q.element_size()
    return 64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16


def _key_tile_size(bs_pad: int, tile: int) -> int:
    """Keys per tile: whole blocks, about ``tile`` keys (at least 16 for tl.dot) when blocks are small."""
    return max(16, bs_pad, tile // bs_pad * bs_pad)


def llsa_fwd(q, k, v, kp, vp, plan, block_size: int, scale: float):
    """Forward over ``plan = [fine, pooled, pb_offsets, pbias]``. Returns ``out (B, H, N, Dv)`` in q's dtype and
    ``lse (B, H, N)`` fp32."""
    import torch

    fine, pooled, pb_off, pbias = plan
    B, H, N, D = q.shape
    DV = v.shape[3]
    NB = fine.shape[2]
    out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    meta = _meta(q, v, block_size)
    _llsa_fwd_kernel[(NB, B * H)](
        q, k, v, kp, vp, out, lse, fine, pooled, pb_off, pbias,
        *q.stride(), *k.stride(), *v.stride(), *kp.stride(), *vp.stride(), *out.stride()[:3], *lse.stride()[:2],
        N, NB, H, D, DV, block_size, fine.shape[3], pooled.shape[3], scale,
        BLOCK_M=_pow2(block_size), BLOCK_N=_key_tile_size(meta["BS_PAD"], _tile(q, meta["BLOCK_D"])), **meta,
    )
    return out, lse


def llsa_bwd(q, k, v, kp, vp, dout, lse, delta, plan, key_side, block_size: int, scale: float):
    """Backward. ``key_side = (t_indptr, t_indices, ranges, blocks)`` (``ops.llsa_plan.transpose`` and
    ``pooled_items``). Returns ``dq`` (q's dtype), ``dk, dv`` through the fine keys only (fp32) and the items'
    partial pooled gradients ``part_k (B*H, I, BS, D)``, ``part_v (B*H, I, BS, Dv)`` (fp32); all contiguous."""
    import torch

    fine, pooled, pb_off, pbias = plan
    t_indptr, t_indices, ranges, blocks = key_side
    B, H, N, D = q.shape
    DV = v.shape[3]
    NB, NI = fine.shape[2], ranges.shape[0]
    dout = dout.contiguous()
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, N, D, dtype=torch.float32, device=q.device)  # fp32: the pooled gradients are added next
    dv = torch.empty(B, H, N, DV, dtype=torch.float32, device=q.device)
    part_k = torch.empty(B * H, NI, block_size, D, dtype=torch.float32, device=q.device)
    part_v = torch.empty(B * H, NI, block_size, DV, dtype=torch.float32, device=q.device)
    meta = _meta(q, v, block_size)
    tile = _tile(q, max(meta["BLOCK_D"], meta["BLOCK_DV"]))
    lse_strides = (*dout.stride()[:3], *lse.stride()[:2])
    _llsa_bwd_dq_kernel[(NB, B * H)](
        q, k, v, kp, vp, dout, lse, delta, dq, fine, pooled, pb_off, pbias,
        *q.stride(), *k.stride(), *v.stride(), *kp.stride(), *vp.stride(), *lse_strides,
        N, NB, H, D, DV, block_size, fine.shape[3], pooled.shape[3], scale,
        BLOCK_M=_pow2(block_size), BLOCK_N=_key_tile_size(meta["BS_PAD"], tile), **meta,
    )
    _llsa_bwd_fine_dkv_kernel[(NB, B * H)](
        q, k, v, dout, lse, delta, dk, dv, t_indptr, t_indices,
        *q.stride(), *k.stride(), *v.stride(), *lse_strides,
        N, NB, H, D, DV, block_size, fine.shape[3], scale,
        BLOCK_K=_pow2(block_size), BLOCK_MQ=_key_tile_size(meta["BS_PAD"], tile), **meta,
    )
    meta.pop("BS_PAD")
    _llsa_bwd_pooled_dkv_kernel[(NI, B * H)](
        q, kp, vp, dout, lse, delta, part_k, part_v, ranges, blocks, pb_off, pbias,
        *q.stride(), *kp.stride(), *vp.stride(), *lse_strides,
        N, NI, H, D, DV, block_size, scale,
        BLOCK_K=_pow2(block_size), BLOCK_MQ=max(16, tile), **meta,
    )
    return dq, dk, dv, part_k, part_v
