"""Triton kernels of the block attention engine (CLEAR, GRAT): forward and backward over a block plan.

One program per (query block, batch·head) in the forward and the dq pass, one per (key block, batch·head) in the
dk/dv pass (over the transposed plan), so no output is written by two programs and no atomics are needed.
Rows are gathered through the plan's permutations (int64 offsets), ragged blocks and head dims that are not
powers of two are masked, full entries skip the element mask, and softmax runs in base 2 with fp32 state.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _block_rows(perm_ptr, off_ptr, block, BLOCK: tl.constexpr):
    """Layout positions, sequence rows (int64) and validity of the ``BLOCK`` slots of block ``block``."""
    start = tl.load(off_ptr + block)
    ok = tl.arange(0, BLOCK) < tl.load(off_ptr + block + 1) - start
    pos = start + tl.arange(0, BLOCK)
    rows = tl.load(perm_ptr + pos, mask=ok, other=0).to(tl.int64)
    return pos, rows, ok


@triton.jit
def _load_rows(ptr, base, rows, ok, stride_n, stride_d, width, BLOCK_W: tl.constexpr):
    """``(len(rows), BLOCK_W)`` tile of gathered rows, zero outside ``ok`` rows and ``width`` columns."""
    o_w = tl.arange(0, BLOCK_W)
    return tl.load(ptr + base + rows[:, None] * stride_n + o_w[None, :] * stride_d,
                   mask=ok[:, None] & (o_w[None, :] < width), other=0.0)


@triton.jit
def _element_mask(
    b, q_pos, k_pos, q_ok, k_ok, q_coords_ptr, k_coords_ptr, valid_ptr, stride_valid_b,
    max_d2, max_dt, SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr,
):
    """Allowed pairs of a masked entry: ``(len(q_pos), len(k_pos))`` bool (positions in layout order)."""
    allowed = q_ok[:, None] & k_ok[None, :]
    if HAS_VALID:
        valid = tl.load(valid_ptr + b * stride_valid_b + k_pos, mask=k_ok, other=0)
        allowed = allowed & (valid != 0)[None, :]
    if SPATIAL:
        qt = tl.load(q_coords_ptr + 3 * q_pos, mask=q_ok, other=-1)
        qy = tl.load(q_coords_ptr + 3 * q_pos + 1, mask=q_ok, other=0)
        qx = tl.load(q_coords_ptr + 3 * q_pos + 2, mask=q_ok, other=0)
        kt = tl.load(k_coords_ptr + 3 * k_pos, mask=k_ok, other=-1)
        ky = tl.load(k_coords_ptr + 3 * k_pos + 1, mask=k_ok, other=0)
        kx = tl.load(k_coords_ptr + 3 * k_pos + 2, mask=k_ok, other=0)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        dt = qt[:, None] - kt[None, :]
        dt = tl.where(dt < 0, -dt, dt)
        near = (dy * dy + dx * dx <= max_d2) & (dt <= max_dt)
        text = (qt[:, None] < 0) | (kt[None, :] < 0)
        allowed = allowed & (near | text)
    return allowed


@triton.jit(do_not_specialize=["N_Q", "N_K", "max_d2", "max_dt"])
def _block_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    q_perm_ptr, q_off_ptr, k_perm_ptr, k_off_ptr, indptr_ptr, indices_ptr, kinds_ptr,
    q_coords_ptr, k_coords_ptr, valid_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_valid_b,
    N_Q, N_K, H, D, DV, qk_scale, max_d2, max_dt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr,
):
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_dv = tl.arange(0, BLOCK_DV)
    q_pos, q_rows, m_q = _block_rows(q_perm_ptr, q_off_ptr, i_q, BLOCK_M)
    b_q = _load_rows(q_ptr, i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    e_start = tl.load(indptr_ptr + i_q)
    e_end = tl.load(indptr_ptr + i_q + 1)
    for e in range(e_start, e_end):
        j = tl.load(indices_ptr + e)
        kind = tl.load(kinds_ptr + e)
        k_pos, k_rows, m_k = _block_rows(k_perm_ptr, k_off_ptr, j, BLOCK_N)
        b_k = _load_rows(k_ptr, i_b * stride_kb + i_h * stride_kh, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
        b_v = _load_rows(v_ptr, i_b * stride_vb + i_h * stride_vh, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        if kind != 0:
            allowed = _element_mask(i_b, q_pos, k_pos, m_q, m_k, q_coords_ptr, k_coords_ptr, valid_ptr,
                                    stride_valid_b, max_d2, max_dt, SPATIAL, HAS_VALID)
        else:
            allowed = m_q[:, None] & m_k[None, :]
        b_s = tl.where(allowed, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(b_p, 1)
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = m_new

    has_key = b_l > 0.0
    b_out = b_acc / tl.where(has_key, b_l, 1.0)[:, None]
    p_out = out_ptr + i_b * stride_ob + i_h * stride_oh + q_rows[:, None] * stride_on + o_dv[None, :]
    tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m_q[:, None] & (o_dv[None, :] < DV))
    lse = tl.where(has_key, (b_m + tl.log2(tl.where(has_key, b_l, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + i_b * stride_lb + i_h * stride_lh + q_rows, lse, mask=m_q)


@triton.jit(do_not_specialize=["N_Q", "N_K", "max_d2", "max_dt"])
def _block_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    q_perm_ptr, q_off_ptr, k_perm_ptr, k_off_ptr, indptr_ptr, indices_ptr, kinds_ptr,
    q_coords_ptr, k_coords_ptr, valid_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh, stride_valid_b,
    N_Q, N_K, H, D, DV, scale, max_d2, max_dt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr,
):
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    q_pos, q_rows, m_q = _block_rows(q_perm_ptr, q_off_ptr, i_q, BLOCK_M)
    b_q = _load_rows(q_ptr, i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
    b_do = _load_rows(do_ptr, i_b * stride_dob + i_h * stride_doh, q_rows, m_q, stride_don, 1, DV, BLOCK_DV)
    l_off = i_b * stride_lb + i_h * stride_lh + q_rows
    b_lse = tl.load(lse_ptr + l_off, mask=m_q, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta_ptr + l_off, mask=m_q, other=0.0)
    qk_scale = scale * 1.4426950408889634
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for e in range(tl.load(indptr_ptr + i_q), tl.load(indptr_ptr + i_q + 1)):
        j = tl.load(indices_ptr + e)
        kind = tl.load(kinds_ptr + e)
        k_pos, k_rows, m_k = _block_rows(k_perm_ptr, k_off_ptr, j, BLOCK_N)
        b_k = _load_rows(k_ptr, i_b * stride_kb + i_h * stride_kh, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
        b_v = _load_rows(v_ptr, i_b * stride_vb + i_h * stride_vh, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        if kind != 0:
            allowed = _element_mask(i_b, q_pos, k_pos, m_q, m_k, q_coords_ptr, k_coords_ptr, valid_ptr,
                                    stride_valid_b, max_d2, max_dt, SPATIAL, HAS_VALID)
        else:
            allowed = m_q[:, None] & m_k[None, :]
        b_p = tl.where(allowed, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    p_dq = dq_ptr + ((i_b * H + i_h) * N_Q + q_rows[:, None]) * D + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq_ptr.dtype.element_ty), mask=m_q[:, None] & (o_d[None, :] < D))


@triton.jit(do_not_specialize=["N_Q", "N_K", "max_d2", "max_dt"])
def _block_attention_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    q_perm_ptr, q_off_ptr, k_perm_ptr, k_off_ptr, t_indptr_ptr, t_indices_ptr, t_kinds_ptr,
    q_coords_ptr, k_coords_ptr, valid_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh, stride_valid_b,
    N_Q, N_K, H, D, DV, scale, max_d2, max_dt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    k_pos, k_rows, m_k = _block_rows(k_perm_ptr, k_off_ptr, i_k, BLOCK_N)
    b_k = _load_rows(k_ptr, i_b * stride_kb + i_h * stride_kh, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
    b_v = _load_rows(v_ptr, i_b * stride_vb + i_h * stride_vh, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
    qk_scale = scale * 1.4426950408889634
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for e in range(tl.load(t_indptr_ptr + i_k), tl.load(t_indptr_ptr + i_k + 1)):
        i = tl.load(t_indices_ptr + e)
        kind = tl.load(t_kinds_ptr + e)
        q_pos, q_rows, m_q = _block_rows(q_perm_ptr, q_off_ptr, i, BLOCK_M)
        b_q = _load_rows(q_ptr, i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
        b_do = _load_rows(do_ptr, i_b * stride_dob + i_h * stride_doh, q_rows, m_q, stride_don, 1, DV, BLOCK_DV)
        l_off = i_b * stride_lb + i_h * stride_lh + q_rows
        b_lse = tl.load(lse_ptr + l_off, mask=m_q, other=0.0) * 1.4426950408889634
        b_delta = tl.load(delta_ptr + l_off, mask=m_q, other=0.0)
        b_st = tl.dot(b_k, tl.trans(b_q)) * qk_scale  # (keys, queries)
        if kind != 0:
            allowed = tl.trans(_element_mask(i_b, q_pos, k_pos, m_q, m_k, q_coords_ptr, k_coords_ptr, valid_ptr,
                                             stride_valid_b, max_d2, max_dt, SPATIAL, HAS_VALID))
        else:
            allowed = m_k[:, None] & m_q[None, :]
        b_pt = tl.where(allowed, tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)
        b_dpt = tl.dot(b_v, tl.trans(b_do))
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)
    base = (i_b * H + i_h) * N_K
    tl.store(dk_ptr + (base + k_rows[:, None]) * D + o_d[None, :], (b_dk * scale).to(dk_ptr.dtype.element_ty),
             mask=m_k[:, None] & (o_d[None, :] < D))
    tl.store(dv_ptr + (base + k_rows[:, None]) * DV + o_dv[None, :], b_dv.to(dv_ptr.dtype.element_ty),
             mask=m_k[:, None] & (o_dv[None, :] < DV))


# --- launchers -------------------------------------------------------------------------------------------------


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _meta(q, v, max_blocks, max_d2, key_valid):
    block_d = _block(q.shape[3])
    return dict(
        BLOCK_M=_block(max_blocks[0]), BLOCK_N=_block(max_blocks[1]),
        BLOCK_D=block_d, BLOCK_DV=_block(v.shape[3]),
        SPATIAL=max_d2 >= 0, HAS_VALID=key_valid is not None,
        num_warps=8 if block_d >= 128 else 4, num_stages=2,
    )


def block_attention_fwd(q, k, v, plan_tensors, key_valid, max_d2: int, max_dt: int, max_blocks, scale: float):
    """Forward over a plan (``ops.block_plan.PLAN_FIELDS`` order). Returns ``out (B, H, N, Dv)`` in q's dtype and
    ``lse (B, H, N)`` fp32."""
    import torch

    q_perm, q_off, k_perm, k_off, indptr, indices, kinds, _, _, _, q_coords, k_coords = plan_tensors
    B, H, N, D = q.shape
    DV = v.shape[3]
    out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    valid = key_valid if key_valid is not None else kinds  # any pointer; unused without HAS_VALID
    grid = (q_off.numel() - 1, B * H)
    _block_attention_fwd_kernel[grid](
        q, k, v, out, lse, q_perm, q_off, k_perm, k_off, indptr, indices, kinds, q_coords, k_coords, valid,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *lse.stride()[:2],
        valid.stride(0) if key_valid is not None else 0,
        N, k.shape[2], H, D, DV, scale * LOG2_E, max_d2, max_dt,
        **_meta(q, v, max_blocks, max_d2, key_valid),
    )
    return out, lse


def block_attention_bwd(q, k, v, out, dout, lse, plan_tensors, key_valid, max_d2: int, max_dt: int, max_blocks,
                        scale: float):
    """Backward over a plan: ``(dq, dk, dv)`` (contiguous, q's dtype)."""
    import torch

    q_perm, q_off, k_perm, k_off, indptr, indices, kinds, t_indptr, t_indices, t_kinds, q_coords, k_coords = plan_tensors
    B, H, N, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, NK, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, NK, DV, dtype=q.dtype, device=q.device)
    valid = key_valid if key_valid is not None else kinds
    common = (
        *q.stride(), *k.stride(), *v.stride(), *dout.stride()[:3], *lse.stride()[:2],
        valid.stride(0) if key_valid is not None else 0,
        N, NK, H, D, DV, scale, max_d2, max_dt,
    )
    meta = _meta(q, v, max_blocks, max_d2, key_valid)
    _block_attention_bwd_dq_kernel[(q_off.numel() - 1, B * H)](
        q, k, v, dout, lse, delta, dq, q_perm, q_off, k_perm, k_off, indptr, indices, kinds,
        q_coords, k_coords, valid, *common, **meta,
    )
    _block_attention_bwd_dkv_kernel[(k_off.numel() - 1, B * H)](
        q, k, v, dout, lse, delta, dk, dv, q_perm, q_off, k_perm, k_off, t_indptr, t_indices, t_kinds,
        q_coords, k_coords, valid, *common, **meta,
    )
    return dq, dk, dv
