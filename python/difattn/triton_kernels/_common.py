"""What every Triton attention kernel shares: constants, row and tile loaders, the online-softmax step.

Softmax runs in base 2: logits are scaled by ``scale · log2(e)`` so that every exponential is an ``exp2``, and the
log-sum-exp is stored in natural log (``· ln 2``) for the backward and the callers. Every helper is inlined into
its kernel by the compiler, so sharing them costs nothing at run time.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN_2: tl.constexpr = tl.constexpr(0.6931471805599453)
F32_MIN_NORMAL: tl.constexpr = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def block_rows(perm_ptr, off_ptr, i_blk, BLOCK: tl.constexpr):
    """Block ``i_blk`` of a permuted layout (``off (M+1,)`` block offsets, ``perm (N,)`` layout position → sequence
    row): the ``(BLOCK,)`` layout positions, sequence rows (int64) and mask of its slots."""
    return block_part_rows(perm_ptr, off_ptr, i_blk, 0, BLOCK)


@triton.jit
def block_part_rows(perm_ptr, off_ptr, i_blk, i_part, BLOCK: tl.constexpr):
    """Part ``i_part`` (slots ``i_part·BLOCK ..``) of block ``i_blk``, as :func:`block_rows` returns a block."""
    i_start = tl.load(off_ptr + i_blk) + i_part * BLOCK
    o_slot = tl.arange(0, BLOCK)
    m_rows = o_slot < tl.load(off_ptr + i_blk + 1) - i_start
    # Scalar start, 32-bit slot offsets: int64 offset vectors here cost registers in every loop that calls this.
    o_rows = tl.load(perm_ptr + i_start + o_slot, mask=m_rows, other=0).to(tl.int64)
    return i_start + o_slot, o_rows, m_rows


@triton.jit
def load_tile(p_base, o_r, o_c, m_r, m_c, stride_r, stride_c):
    """``(len(o_r), len(o_c))`` tile at ``p_base + o_r·stride_r + o_c·stride_c``, zero outside ``m_r × m_c``."""
    return tl.load(p_base + o_r[:, None] * stride_r + o_c[None, :] * stride_c, mask=m_r[:, None] & m_c[None, :],
                   other=0.0)


@triton.jit
def load_tile_t(p_base, o_r, o_c, m_r, m_c, stride_r, stride_c):
    """``(len(o_c), len(o_r))``: the transpose of :func:`load_tile`'s tile, read transposed (no ``tl.trans``).

    The row offsets are added first, as in :func:`load_tile` (with the column offsets first, ptxas spills hundreds
    of bytes more in LLSA's kernels at head dim 128)."""
    return tl.load(p_base + o_r[None, :] * stride_r + o_c[:, None] * stride_c, mask=m_r[None, :] & m_c[:, None],
                   other=0.0)


@triton.jit
def load_rows(p_base, o_r, m_r, stride_r, stride_c, width, BLOCK_W: tl.constexpr):
    """``(len(o_r), BLOCK_W)`` tile of whole rows of ``width`` columns (zero past ``width`` and outside ``m_r``)."""
    o_c = tl.arange(0, BLOCK_W)
    return load_tile(p_base, o_r, o_c, m_r, o_c < width, stride_r, stride_c)


@triton.jit
def store_tile(p_base, o_r, o_c, m_r, m_c, stride_r, stride_c, b_x):
    """Stores the ``(len(o_r), len(o_c))`` tile ``b_x`` at ``p_base + o_r·stride_r + o_c·stride_c`` inside
    ``m_r × m_c``, in the pointee dtype."""
    tl.store(p_base + o_r[:, None] * stride_r + o_c[None, :] * stride_c, b_x.to(p_base.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])


@triton.jit
def store_rows(p_base, o_r, m_r, stride_r, width, b_x, BLOCK_W: tl.constexpr):
    """Stores the ``(len(o_r), BLOCK_W)`` tile ``b_x`` into rows ``o_r`` (unit column stride, ``width`` columns)."""
    o_c = tl.arange(0, BLOCK_W)
    store_tile(p_base, o_r, o_c, m_r, o_c < width, stride_r, 1, b_x)


@triton.jit
def load_row_stats(p_lse, p_delta, o_r, m_r):
    """Per query row of the backward: the log-sum-exp in base 2 and ``Δ = rowsum(dout·out)`` (0 outside ``m_r``)."""
    b_lse = tl.load(p_lse + o_r, mask=m_r, other=0.0) * LOG2_E
    b_delta = tl.load(p_delta + o_r, mask=m_r, other=0.0)
    return b_lse, b_delta


@triton.jit
def online_softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION: tl.constexpr):
    """One key tile of the online softmax.

    ``b_s (M, N)``: base-2 logits, ``-inf`` where a pair is not allowed; ``b_v (N, DV)``: the tile's values;
    ``b_m, b_l (M,)`` and ``b_acc (M, DV)``: the running max, sum and weighted values (fp32). Returns them updated,
    then ``alpha (M,)`` (the factor the old state was rescaled by) and ``b_p (M, N)`` (the tile's weights), for
    state kept beside them (PISA's first-order sum). A row that has seen no allowed key keeps ``m = -inf``,
    ``l = 0``: its max is taken as 0 so that no ``-inf − -inf`` arises. ``tl.max`` skips NaN; a NaN logit reaches
    the output through its weight ``2^(NaN − m) = NaN``, as in a plain softmax.
    """
    m_new = tl.maximum(b_m, tl.max(b_s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_safe)
    b_p = tl.exp2(b_s - m_safe[:, None])
    b_l = b_l * alpha + tl.sum(b_p, 1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return m_new, b_l, b_acc, alpha, b_p


@triton.jit
def online_softmax_step_t(b_st, b_vt, b_m, b_l, b_acc_t, PRECISION: tl.constexpr):
    """:func:`online_softmax_step` on transposed tiles, keys along axis 0: ``b_st (N, M)``, ``b_vt (DV, N)``,
    ``b_acc_t (DV, M)`` (what keeps a tensor-core tile's M at the keys or the head dim when query tiles are
    narrow). Returns ``b_m, b_l, b_acc_t`` updated."""
    m_new = tl.maximum(b_m, tl.max(b_st, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_safe)
    b_pt = tl.exp2(b_st - m_safe[None, :])
    b_l = b_l * alpha + tl.sum(b_pt, 0)
    b_acc_t = b_acc_t * alpha[None, :] + tl.dot(b_vt, b_pt.to(b_vt.dtype), input_precision=PRECISION)
    return m_new, b_l, b_acc_t


@triton.jit
def online_softmax_finish(b_m, b_l):
    """``(1/l, lse)`` of the final state, ``(M,)`` each; ``lse`` in natural log. Rows without any allowed key get
    ``1/l = 1`` (their accumulator is 0, so the output is 0) and ``lse = -inf``; a row that met a NaN logit (``l``
    NaN) keeps NaN in both, so its backward is NaN too, as the reference's."""
    has_key = b_l != 0.0
    b_l = tl.where(has_key, b_l, 1.0)
    return 1.0 / b_l, tl.where(has_key, (b_m + tl.log2(b_l)) * LN_2, float("-inf"))
