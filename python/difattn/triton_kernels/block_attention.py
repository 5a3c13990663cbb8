"""Triton kernels of the block attention engine: forward and backward over a key-block list per query block.

CLEAR and GRAT run it over a block plan (one for every batch·head); PISA runs its exact part on it, over its
selection (``attend_blocks`` and ``dq_blocks`` inside its own kernels, the dk/dv kernel with one transposed list
per batch·head). One program per (query block, batch·head) in the forward and the dq pass, one per (key block,
batch·head) in the dk/dv pass (over the transposed lists), so no output is written by two programs and no atomics
are needed. Rows are gathered through permutations (int64 offsets), ragged blocks and head dims that are not powers
of two are masked, full entries skip the element mask (compiled out when no entry can be masked), and softmax runs
in base 2 with fp32 state.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    LOG2_E, block_part_rows, block_rows, load_row_stats, load_rows, online_softmax_finish, online_softmax_step, store_rows,
)


@triton.jit
def _entry_kind(p_kind, SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr):
    """Kind of a plan entry (0: full block; with SPATIAL, ``m + 1`` for the entry whose disc bits are row ``m``),
    read only when an entry can carry an element mask. Loaded at the top of
    the loops, before the tiles (ptxas spills less than with the load next to its use)."""
    i_kind = 0
    if SPATIAL or HAS_VALID:
        i_kind = tl.load(p_kind)
    return i_kind


@triton.jit
def _outer(x_q, x_k, TRANSPOSED: tl.constexpr):
    """Per-query ``x_q`` and per-key ``x_k`` expanded to broadcast over a (queries, keys) tile, or over a
    (keys, queries) tile when TRANSPOSED (the dk/dv pass), so that no mask is built and then transposed."""
    if TRANSPOSED:
        e_q = x_q[None, :]
        e_k = x_k[:, None]
    else:
        e_q = x_q[:, None]
        e_k = x_k[None, :]
    return e_q, e_k


@triton.jit
def _element_mask(
    i_kind, i_b, q_slot, k_pos, m_q, m_k, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
    BLOCK_N: tl.constexpr, SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Allowed pairs of a masked entry (tile orientation as :func:`_outer`): with SPATIAL, the entry's disc bits
    (row ``i_kind - 1`` of ``bits_ptr``: one int64 word per query slot ``q_slot``, whose bit ``b`` allows key slot
    ``b``; zero outside both blocks), else the valid slots; and a valid key (HAS_VALID, ``valid_ptr`` indexed by
    the keys' layout positions ``k_pos``)."""
    if SPATIAL:
        i_word = (i_kind - 1).to(tl.int64) * stride_bits + q_slot
        o_k = tl.arange(0, BLOCK_N)
        if TRANSPOSED:
            b_word = tl.load(bits_ptr + i_word, mask=m_q, other=0)
            m_s = ((b_word[None, :] >> o_k[:, None].to(tl.int64)) & 1) != 0
        else:
            # The words as 32-bit halves (little-endian): on (queries, keys) tiles ptxas needs fewer registers and
            # instructions for 32-bit shifts than for 64-bit ones; on (keys, queries) tiles it is the other way.
            p_half = bits_ptr.to(tl.pointer_type(tl.int32)) + 2 * i_word
            b_lo = tl.load(p_half, mask=m_q, other=0)
            b_hi = tl.load(p_half + 1, mask=m_q, other=0)
            b_half = tl.where(o_k[None, :] < 32, b_lo[:, None], b_hi[:, None])
            m_s = ((b_half >> (o_k[None, :] & 31)) & 1) != 0
    else:
        e_mq, e_mk = _outer(m_q, m_k, TRANSPOSED)
        m_s = e_mq & e_mk
    if HAS_VALID:
        b_valid = tl.load(valid_ptr + i_b * stride_valid_b + k_pos, mask=m_k, other=0)
        _, e_valid = _outer(m_q, b_valid != 0, TRANSPOSED)
        m_s = m_s & e_valid
    return m_s


@triton.jit
def _pair_mask(
    i_kind, i_b, q_slot, k_pos, m_q, m_k, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
    BLOCK_N: tl.constexpr, SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Allowed pairs of one plan entry (orientation as :func:`_outer`): the valid slots of a full entry
    (``i_kind`` 0, see :func:`_entry_kind`), :func:`_element_mask` of a masked one. Each branch builds its own
    mask, so no tile-sized mask stays live across the masked branch."""
    if SPATIAL or HAS_VALID:
        if i_kind != 0:
            m_s = _element_mask(i_kind, i_b, q_slot, k_pos, m_q, m_k, bits_ptr, stride_bits, valid_ptr,
                                stride_valid_b, BLOCK_N, SPATIAL, HAS_VALID, TRANSPOSED)
        else:
            e_mq, e_mk = _outer(m_q, m_k, TRANSPOSED)
            m_s = e_mq & e_mk
    else:
        e_mq, e_mk = _outer(m_q, m_k, TRANSPOSED)
        m_s = e_mq & e_mk
    return m_s


@triton.jit
def attend_blocks(
    b_q, b_m, b_l, b_acc, q_slot, m_q, p_blocks, p_kinds, e_start, e_end, k_perm_ptr, k_off_ptr,
    p_k, p_v, stride_kn, stride_kd, stride_vn, stride_vd, D, DV, qk_scale,
    i_b, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax of one query block over the key blocks ``p_blocks[e_start:e_end]`` (entry kinds at
    ``p_kinds``, see :func:`_entry_kind` and :func:`_pair_mask`).

    ``b_q (BLOCK_M, BLOCK_D)``; state ``b_m, b_l (BLOCK_M,)``, ``b_acc (BLOCK_M, BLOCK_DV)`` fp32, returned updated;
    ``q_slot, m_q (BLOCK_M,)``: the query rows' slots in their block and their mask; ``p_k, p_v``: this batch·head's
    k and v; ``qk_scale = scale · log2(e)``; ``bits_ptr``, ``stride_bits``: the plan's disc bits (SPATIAL) and
    their row stride; ``valid_ptr`` (HAS_VALID): the keys' validity of batch ``i_b`` at ``i_b · stride_valid_b``.
    """
    for e in range(e_start, e_end):
        i_blk = tl.load(p_blocks + e)
        i_kind = _entry_kind(p_kinds + e, SPATIAL, HAS_VALID)
        k_pos, k_rows, m_k = block_rows(k_perm_ptr, k_off_ptr, i_blk, BLOCK_N)
        b_k = load_rows(p_k, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
        b_v = load_rows(p_v, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        m_s = _pair_mask(i_kind, i_b, q_slot, k_pos, m_q, m_k, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
                         BLOCK_N, SPATIAL, HAS_VALID, False)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m, b_l, b_acc, _, _ = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION)
    return b_m, b_l, b_acc


@triton.jit
def dq_blocks(
    b_q, b_do, b_lse, b_delta, b_dq, q_slot, m_q, p_blocks, p_kinds, e_start, e_end, k_perm_ptr, k_off_ptr,
    p_k, p_v, stride_kn, stride_kd, stride_vn, stride_vd, D, DV, qk_scale,
    i_b, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dq += dS·k`` (unscaled, fp32 ``(BLOCK_M, BLOCK_D)``) of one query block over the key blocks
    ``p_blocks[e_start:e_end]``: ``P = 2^(s − lse)``, ``dS = P ∘ (dout·vᵀ − Δ)``.

    ``b_do (BLOCK_M, BLOCK_DV)``, ``b_lse`` (base 2) and ``b_delta (BLOCK_M,)``: the query rows' backward inputs;
    the other arguments as in :func:`attend_blocks`.
    """
    for e in range(e_start, e_end):
        i_blk = tl.load(p_blocks + e)
        i_kind = _entry_kind(p_kinds + e, SPATIAL, HAS_VALID)
        k_pos, k_rows, m_k = block_rows(k_perm_ptr, k_off_ptr, i_blk, BLOCK_N)
        b_k = load_rows(p_k, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
        b_v = load_rows(p_v, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        m_s = _pair_mask(i_kind, i_b, q_slot, k_pos, m_q, m_k, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
                         BLOCK_N, SPATIAL, HAS_VALID, False)
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    return b_dq


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _block_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    q_perm_ptr, q_off_ptr, k_perm_ptr, k_off_ptr, indptr_ptr, indices_ptr, kinds_ptr,
    bits_ptr, valid_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_bits, stride_valid_b,
    N_Q, N_K, H, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block of one batch·head: ``out (BLOCK_M, DV)`` and ``lse (BLOCK_M,)`` over the plan's row."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    _, q_rows, m_q = block_rows(q_perm_ptr, q_off_ptr, i_q, BLOCK_M)
    b_q = load_rows(q_ptr + i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_m, b_l, b_acc = attend_blocks(
        b_q, b_m, b_l, b_acc, tl.arange(0, BLOCK_M), m_q, indices_ptr, kinds_ptr, tl.load(indptr_ptr + i_q),
        tl.load(indptr_ptr + i_q + 1), k_perm_ptr, k_off_ptr, k_ptr + i_b * stride_kb + i_h * stride_kh,
        v_ptr + i_b * stride_vb + i_h * stride_vh, stride_kn, stride_kd, stride_vn, stride_vd, D, DV,
        scale * LOG2_E, i_b, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
        BLOCK_N, BLOCK_D, BLOCK_DV, SPATIAL, HAS_VALID, PRECISION,
    )
    b_inv_l, b_lse = online_softmax_finish(b_m, b_l)
    store_rows(out_ptr + i_b * stride_ob + i_h * stride_oh, q_rows, m_q, stride_on, DV, b_acc * b_inv_l[:, None],
               BLOCK_DV)
    tl.store(lse_ptr + i_b * stride_lb + i_h * stride_lh + q_rows, b_lse, mask=m_q)


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _block_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    q_perm_ptr, q_off_ptr, k_perm_ptr, k_off_ptr, indptr_ptr, indices_ptr, kinds_ptr,
    bits_ptr, valid_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh, stride_bits, stride_valid_b,
    N_Q, N_K, H, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dq (BLOCK_M, D)`` of one query block of one batch·head (contiguous ``(B, H, N_Q, D)`` output)."""
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    _, q_rows, m_q = block_rows(q_perm_ptr, q_off_ptr, i_q, BLOCK_M)
    b_q = load_rows(q_ptr + i_b * stride_qb + i_h * stride_qh, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
    b_do = load_rows(do_ptr + i_b * stride_dob + i_h * stride_doh, q_rows, m_q, stride_don, 1, DV, BLOCK_DV)
    o_l = i_b * stride_lb + i_h * stride_lh
    b_lse, b_delta = load_row_stats(lse_ptr + o_l, delta_ptr + o_l, q_rows, m_q)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_dq = dq_blocks(
        b_q, b_do, b_lse, b_delta, b_dq, tl.arange(0, BLOCK_M), m_q, indices_ptr, kinds_ptr, tl.load(indptr_ptr + i_q),
        tl.load(indptr_ptr + i_q + 1), k_perm_ptr, k_off_ptr, k_ptr + i_b * stride_kb + i_h * stride_kh,
        v_ptr + i_b * stride_vb + i_h * stride_vh, stride_kn, stride_kd, stride_vn, stride_vd, D, DV,
        scale * LOG2_E, i_b, bits_ptr, stride_bits, valid_ptr, stride_valid_b,
        BLOCK_N, BLOCK_D, BLOCK_DV, SPATIAL, HAS_VALID, PRECISION,
    )
    store_rows(dq_ptr + i_bh * N_Q * D, q_rows, m_q, D, D, b_dq * scale, BLOCK_D)


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _block_attention_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    q_perm_ptr, q_off_ptr, k_perm_ptr, k_off_ptr, t_indptr_ptr, t_indices_ptr, t_kinds_ptr,
    bits_ptr, valid_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh, stride_bits, stride_valid_b, stride_t_indptr_bh, stride_t_indices_bh,
    N_Q, N_K, H, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPATIAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, BLOCK_MP: tl.constexpr,
):
    """``dk (BLOCK_N, D)``, ``dv (BLOCK_N, DV)`` of one key block of one batch·head over the query blocks of the
    transposed plan (contiguous ``(B, H, N_K, ·)`` outputs): ``dv = Pᵀ dout``, ``dk = dSᵀ q``.

    The transposed lists are shared by every batch·head (strides 0, the block plans) or one per batch·head
    (PISA's selections). Query blocks are taken ``BLOCK_MP`` rows at a time (one loop step per part: a whole
    128-row block with q, dout and four (keys, queries) tiles live spills registers on sm_90).
    """
    i_k = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    k_pos, k_rows, m_k = block_rows(k_perm_ptr, k_off_ptr, i_k, BLOCK_N)
    b_k = load_rows(k_ptr + i_b * stride_kb + i_h * stride_kh, k_rows, m_k, stride_kn, stride_kd, D, BLOCK_D)
    b_v = load_rows(v_ptr + i_b * stride_vb + i_h * stride_vh, k_rows, m_k, stride_vn, stride_vd, DV, BLOCK_DV)
    p_q = q_ptr + i_b * stride_qb + i_h * stride_qh
    p_do = do_ptr + i_b * stride_dob + i_h * stride_doh
    o_l = i_b * stride_lb + i_h * stride_lh
    p_t_indptr = t_indptr_ptr + i_bh * stride_t_indptr_bh + i_k
    p_t_indices = t_indices_ptr + i_bh * stride_t_indices_bh
    qk_scale = scale * LOG2_E
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for step in range(tl.load(p_t_indptr) * (BLOCK_M // BLOCK_MP), tl.load(p_t_indptr + 1) * (BLOCK_M // BLOCK_MP)):
        e = step // (BLOCK_M // BLOCK_MP)
        i_blk = tl.load(p_t_indices + e)
        i_kind = _entry_kind(t_kinds_ptr + e, SPATIAL, HAS_VALID)
        i_part = step % (BLOCK_M // BLOCK_MP)
        _, q_rows, m_q = block_part_rows(q_perm_ptr, q_off_ptr, i_blk, i_part, BLOCK_MP)
        b_q = load_rows(p_q, q_rows, m_q, stride_qn, stride_qd, D, BLOCK_D)
        b_do = load_rows(p_do, q_rows, m_q, stride_don, 1, DV, BLOCK_DV)
        b_lse, b_delta = load_row_stats(lse_ptr + o_l, delta_ptr + o_l, q_rows, m_q)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # (keys, queries)
        m_st = _pair_mask(i_kind, i_b, i_part * BLOCK_MP + tl.arange(0, BLOCK_MP), k_pos, m_q, m_k, bits_ptr,
                          stride_bits, valid_ptr, stride_valid_b, BLOCK_N, SPATIAL, HAS_VALID, True)
        b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    o_kv = i_bh * N_K
    store_rows(dk_ptr + o_kv * D, k_rows, m_k, D, D, b_dk * scale, BLOCK_D)
    store_rows(dv_ptr + o_kv * DV, k_rows, m_k, DV, DV, b_dv, BLOCK_DV)


# --- launchers -------------------------------------------------------------------------------------------------


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _query_part(block_m: int, block_d: int) -> int:
    """Query rows per step of the dk/dv loop (``BLOCK_MP``): the fewest rows that keep sm_90's tensor cores busy
    without spilling (64 up to head dim 64, 32 above)."""
    return min(block_m, 64 if block_d <= 64 else 32)


def _meta(q, v, max_blocks, disc_bits, key_valid):
    block_d = _block(q.shape[3])
    block_m = _block(max_blocks[0])
    return dict(
        BLOCK_M=block_m, BLOCK_N=_block(max_blocks[1]),
        BLOCK_D=block_d, BLOCK_DV=_block(v.shape[3]),
        SPATIAL=disc_bits is not None, HAS_VALID=key_valid is not None,
        PRECISION="tf32",  # tl.dot's default: fp32 inputs multiply in tf32 on the GPU
        # Three stages on the 64- and 128-row tiles: the software pipeliner prefetches the key blocks' row indices
        # one iteration before their K/V tiles (two stages prefetch only K/V, behind a dependent index load); K/V
        # stay double-buffered. GRAT's small groups keep two (a third costs them occupancy on sm_90).
        num_warps=8 if block_d >= 128 else 4, num_stages=3 if block_m >= 64 else 2,
    )


def _rows_meta(meta: dict) -> dict:
    """``meta`` of the forward and dq kernels: 8 warps (two warpgroups of 64 rows on sm_90) for 128-row query
    blocks or wide heads."""
    return {**meta, "num_warps": 8 if meta["BLOCK_M"] >= 128 else meta["num_warps"]}


def _mask_args(plan_tensors, key_valid, disc_bits):
    """``(kinds, t_kinds, bits, valid)`` of a launch and the strides ``(bits, valid)``: the disc bits' kinds
    (numbering the masked entries) where the plan has a disc, the plan's kinds otherwise; unused pointers are any
    tensor."""
    kinds, t_kinds = plan_tensors[6], plan_tensors[9]
    if disc_bits is not None:
        kinds, t_kinds = disc_bits.kinds, disc_bits.t_kinds
    bits = disc_bits.bits if disc_bits is not None else kinds
    valid = key_valid if key_valid is not None else kinds
    strides = (bits.stride(0) if disc_bits is not None else 0, valid.stride(0) if key_valid is not None else 0)
    return (kinds, t_kinds, bits, valid), strides


def block_attention_fwd(q, k, v, plan_tensors, key_valid, disc_bits, max_blocks, scale: float):
    """Forward over a plan (``ops.block.plan``'s twelve arrays in ``BlockPlan.tensors()`` order; ``disc_bits``:
    its ``DiscBits`` where it has a disc, else ``None``). Returns ``out (B, H, N, Dv)`` in q's dtype and
    ``lse (B, H, N)`` fp32."""
    import torch

    q_perm, q_off, k_perm, k_off, indptr, indices = plan_tensors[:6]
    (kinds, _, bits, valid), (stride_bits, stride_valid) = _mask_args(plan_tensors, key_valid, disc_bits)
    B, H, N, D = q.shape
    DV = v.shape[3]
    out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    grid = (q_off.numel() - 1, B * H)
    _block_attention_fwd_kernel[grid](
        q, k, v, out, lse, q_perm, q_off, k_perm, k_off, indptr, indices, kinds, bits, valid,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *lse.stride()[:2], stride_bits, stride_valid,
        N, k.shape[2], H, D, DV, scale,
        **_rows_meta(_meta(q, v, max_blocks, disc_bits, key_valid)),
    )
    return out, lse


def block_attention_bwd(q, k, v, out, dout, lse, plan_tensors, key_valid, disc_bits, max_blocks, scale: float):
    """Backward over a plan (arguments as :func:`block_attention_fwd`'s): ``(dq, dk, dv)`` (contiguous, q's
    dtype)."""
    import torch

    q_perm, q_off, k_perm, k_off, indptr, indices, _, t_indptr, t_indices = plan_tensors[:9]
    (kinds, t_kinds, bits, valid), mask_strides = _mask_args(plan_tensors, key_valid, disc_bits)
    B, H, N, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, NK, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, NK, DV, dtype=q.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride()[:3], *lse.stride()[:2], *mask_strides)
    sizes = (N, NK, H, D, DV, scale)
    meta = _meta(q, v, max_blocks, disc_bits, key_valid)
    _block_attention_bwd_dq_kernel[(q_off.numel() - 1, B * H)](
        q, k, v, dout, lse, delta, dq, q_perm, q_off, k_perm, k_off, indptr, indices, kinds,
        bits, valid, *strides, *sizes, **_rows_meta(meta),
    )
    _block_attention_bwd_dkv_kernel[(k_off.numel() - 1, B * H)](
        q, k, v, dout, lse, delta, dk, dv, q_perm, q_off, k_perm, k_off, t_indptr, t_indices, t_kinds,
        bits, valid, *strides, 0, 0,  # one transposed plan for every batch·head
        *sizes, BLOCK_MP=_query_part(meta["BLOCK_M"], meta["BLOCK_D"]), **meta,
    )
    return dq, dk, dv


def whole_block_dkv(q, k, v, dout, lse, delta, perm, offsets, t_indptr, t_indices, scale: float, block: int,
                    meta: dict):
    """``(dk, dv)`` (contiguous, q's dtype) of attention over whole key blocks listed per batch·head: key block j of
    ``(b, h)`` is attended by the query blocks ``t_indices[b·H + h, t_indptr[b·H + h, j] : t_indptr[.., j + 1]]``;
    q and k share one layout (``perm``, ``offsets``). ``dout`` contiguous, ``lse``, ``delta`` ``(B, H, N)`` fp32;
    ``meta``: ``BLOCK_D``, ``BLOCK_DV``, ``PRECISION`` and the launch options."""
    import torch

    B, H, N, D = q.shape
    DV = v.shape[3]
    dk = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    _block_attention_bwd_dkv_kernel[(offsets.numel() - 1, B * H)](
        q, k, v, dout, lse, delta, dk, dv, perm, offsets, perm, offsets, t_indptr, t_indices, t_indices,
        perm, perm, *q.stride(), *k.stride(), *v.stride(), *dout.stride()[:3], *lse.stride()[:2], 0, 0,
        t_indptr.stride(0), t_indices.stride(0), N, N, H, D, DV, scale,  # no kinds, disc bits or validity
        BLOCK_M=block, BLOCK_N=block, SPATIAL=False, HAS_VALID=False, BLOCK_MP=block, **meta,
    )
    return dk, dv
