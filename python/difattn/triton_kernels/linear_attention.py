"""Triton kernels of the linear core (LiT) and DyDiLA, forward and backward (Cao et al., arXiv 2601.13683).

Plan: a prologue materialises DyDiLA's features ``Q̂, K̂`` in fp32 (power maps with per-token exponents, token
differential); the state reduction ``S = (1/Nk) Σ K̂ᵀ V`` (over the Nk keys; ``Nk != N`` for cross-attention) runs
one program per (state tile, token split, batch·head) and writes partial states that are summed over the splits (the
token range is split when B·H alone cannot fill the device); the readout ``O = Q̂ S`` runs one program per (token
block, output tile, batch·head) and loops over the contraction tiles. Head dims that are not powers of two (72, 192,
288) tile the state with masks, so a 288 x 288 fp32 state never has to fit in one program. Every load and store is
masked, offsets are int64, accumulation is fp32 and outputs take the input's dtype.

The backward reuses the two kernels: ``dS = Σ Q̂ᵀ g'`` and ``dm = Σ dden Q̂`` are state reductions,
``dQ̂ = g Sᵀ s + c m``, ``dK̂ = (V dSᵀ + dm) / Nk`` and ``dV = K̂ dS / Nk`` are readouts; a per-token kernel computes
the normalisation terms and the prologue has its own backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import F32_MIN_NORMAL, LN_2, load_tile, store_rows

# tl.dot precision by input dtype where an operand is fp32 (the state, scaled rows, DyDiLA's features): fp32 needs
# IEEE products to match an fp32 reference; fp16 outputs are compared at fp16's precision, which plain tf32 (same
# 10-bit mantissa) would eat into, so it takes the 3-pass split; bf16 has three fewer mantissa bits than tf32.
# Two 16-bit operands of one dtype multiply as they are (see `_dot`).
_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}


def matmul_precision(dtype: torch.dtype) -> str:
    """The kernels' ``PRECISION`` for inputs of ``dtype`` (used where an operand is fp32)."""
    return _PRECISION[dtype]


@dataclass(frozen=True)
class Config:
    """Launch shapes: tokens per step, state/contraction tile, token splits (None: fill the device), warps."""

    block_n: int = 64
    block_d: int = 64
    splits: int | None = None
    num_warps: int = 4


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _tf32_split(x):
    """``(hi, lo)`` of fp32 ``x``: ``hi`` its leading 11 significant bits (exact in tf32), ``lo = x − hi``."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # clear the 13 low mantissa bits
    return hi, x - hi


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a·b`` in fp32, with the matmul precision chosen from where the operands come from.

    Two fp16 (or two bf16) operands multiply as they are: each product of two 16-bit values is exact in fp32 and
    the tensor cores accumulate in fp32. A 16-bit operand beside an fp32 one at ``tf32x3`` is exact in tf32 (same
    or fewer mantissa bits, fp32's exponent range), so of the 3-pass split's products (hi·hi, hi·lo, lo·hi) the
    one with its low part is 0: two tf32 passes over the fp32 operand's high and low parts compute the same sum.
    Anything else multiplies in fp32 at PRECISION."""
    if a.dtype == b.dtype and a.dtype != tl.float32:
        acc = tl.dot(a, b, acc)
    elif PRECISION == "tf32x3" and a.dtype != tl.float32 and b.dtype == tl.float32:
        b_hi, b_lo = _tf32_split(b)
        acc = tl.dot(a.to(tl.float32), b_lo, acc, input_precision="tf32")
        acc = tl.dot(a.to(tl.float32), b_hi, acc, input_precision="tf32")
    elif PRECISION == "tf32x3" and a.dtype == tl.float32 and b.dtype != tl.float32:
        a_hi, a_lo = _tf32_split(a)
        acc = tl.dot(a_lo, b.to(tl.float32), acc, input_precision="tf32")
        acc = tl.dot(a_hi, b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["N", "TOKENS_PER_SPLIT"])
def _state_kernel(
    a_ptr, b_ptr, scale_ptr, weight_ptr, part_ptr, colsum_ptr,
    stride_ab, stride_ah, stride_an, stride_ad,
    stride_bb, stride_bh, stride_bn, stride_bd,
    N, H, DA, DB, TOKENS_PER_SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    ROW_SCALE: tl.constexpr, COLSUM: tl.constexpr, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial ``P = Σ_n a_nᵀ (s_n b_n)`` over one token split, one ``(BLOCK_A, BLOCK_B)`` tile, and (tile column 0)
    the partial column sums ``c = Σ_n w_n a_n``. ``s``, ``w``: per-token fp32 ``(B·H, N)`` arrays."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    n_splits = tl.num_programs(1)
    tiles_b = tl.cdiv(DB, BLOCK_B)
    i_a = i_t // tiles_b
    i_b = i_t % tiles_b
    i_bb = i_bh // H
    i_hh = i_bh % H
    o_a = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_a = o_a < DA
    m_b = o_b < DB
    p_a0 = a_ptr + i_bb * stride_ab + i_hh * stride_ah + o_a[None, :].to(tl.int64) * stride_ad
    p_b0 = b_ptr + i_bb * stride_bb + i_hh * stride_bh + o_b[None, :].to(tl.int64) * stride_bd
    b_acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_A], dtype=tl.float32)
    # Splits hold whole blocks; the last one runs past N, masked. (Loop bounds derived from program ids are
    # 1-element arrays in triton 3.6's interpreter, which numpy 2 refuses as indices: count steps instead.)
    for step in range(0, TOKENS_PER_SPLIT // BLOCK_N):
        o_n = i_s * TOKENS_PER_SPLIT + step * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_n64 = o_n.to(tl.int64)
        b_x = tl.load(p_a0 + o_n64[:, None] * stride_an, mask=m_n[:, None] & m_a[None, :], other=0.0)
        b_y = tl.load(p_b0 + o_n64[:, None] * stride_bn, mask=m_n[:, None] & m_b[None, :], other=0.0)
        if ROW_SCALE:
            b_s = tl.load(scale_ptr + i_bh * N + o_n64, mask=m_n, other=0.0)
            b_y = b_y.to(tl.float32) * b_s[:, None]
        b_acc = _dot(tl.trans(b_x), b_y, b_acc, PRECISION)
        b_x = b_x.to(tl.float32)
        if COLSUM:
            if WEIGHTED:
                b_w = tl.load(weight_ptr + i_bh * N + o_n64, mask=m_n, other=0.0)
                b_sum += tl.sum(b_x * b_w[:, None], 0)
            else:
                b_sum += tl.sum(b_x, 0)
    slot = i_bh * n_splits + i_s
    p_part = part_ptr + slot * DA * DB + o_a[:, None].to(tl.int64) * DB + o_b[None, :]
    tl.store(p_part, b_acc, mask=m_a[:, None] & m_b[None, :])
    if COLSUM:
        if i_b == 0:
            tl.store(colsum_ptr + slot * DA + o_a, b_sum, mask=m_a)


@triton.jit(do_not_specialize=["N"])
def _readout_kernel(
    x_ptr, m_ptr, out_ptr, scale_ptr, coef_ptr, den_vec_ptr, add_vec_ptr,
    stride_xb, stride_xh, stride_xn, stride_xc,
    stride_mc, stride_mo,
    stride_ob, stride_oh, stride_on, stride_oo,
    N, H, C, O, alpha, beta, eps,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
    ROW_SCALE: tl.constexpr, NORM_DEN: tl.constexpr, ADD_VEC: tl.constexpr, COEF: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out_n = (x_n M) · s_n + c_n · vec`` for one token block and output tile, M ``(C, O)`` fp32 per batch·head.

    ``s_n``: ``1 / (x_n · den_vec + eps)`` (NORM_DEN), a per-token array (ROW_SCALE) or ``alpha``; ``c_n``: a
    per-token array (COEF) or ``beta``; vectors are fp32 ``(B·H, C)`` / ``(B·H, O)``."""
    i_n = tl.program_id(0)
    i_o = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_bb = i_bh // H
    i_hh = i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_n = o_n < N
    m_o = o_o < O
    o_n64 = o_n.to(tl.int64)
    p_x0 = x_ptr + i_bb * stride_xb + i_hh * stride_xh + o_n64[:, None] * stride_xn
    p_m0 = m_ptr + i_bh * C * O + o_o[None, :].to(tl.int64) * stride_mo
    b_acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
    b_den = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_x = tl.load(p_x0 + o_c[None, :].to(tl.int64) * stride_xc, mask=m_n[:, None] & m_c[None, :], other=0.0)
        b_m = tl.load(p_m0 + o_c[:, None].to(tl.int64) * stride_mc, mask=m_c[:, None] & m_o[None, :], other=0.0)
        b_acc = _dot(b_x, b_m, b_acc, PRECISION)
        if NORM_DEN:
            b_v = tl.load(den_vec_ptr + i_bh * C + o_c, mask=m_c, other=0.0)
            b_den += tl.sum(b_x.to(tl.float32) * b_v[None, :], 1)
    if NORM_DEN:
        b_acc = b_acc / (b_den + eps)[:, None]
    if ROW_SCALE:
        b_acc = b_acc * tl.load(scale_ptr + i_bh * N + o_n64, mask=m_n, other=0.0)[:, None]
    else:
        b_acc = b_acc * alpha
    if ADD_VEC:
        b_vec = tl.load(add_vec_ptr + i_bh * O + o_o, mask=m_o, other=0.0)
        if COEF:
            b_coef = tl.load(coef_ptr + i_bh * N + o_n64, mask=m_n, other=0.0)
            b_acc += b_coef[:, None] * b_vec[None, :]
        else:
            b_acc += beta * b_vec[None, :]
    p_out = out_ptr + i_bb * stride_ob + i_hh * stride_oh + o_n64[:, None] * stride_on + o_o[None, :] * stride_oo
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_n[:, None] & m_o[None, :])


@triton.jit(do_not_specialize=["N"])
def _norm_bwd_kernel(
    q_ptr, g_ptr, s_ptr, m_ptr, inv_den_ptr, dden_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    N, H, D, DV, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per token of the normalised readout: ``den = q·m + eps``, ``inv_den = 1/den`` and
    ``dden = −(q · g Sᵀ) / den²`` (``g Sᵀ`` built tile by tile over D and Dv)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_bb = i_bh // H
    i_hh = i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_n64 = o_n.to(tl.int64)
    p_q0 = q_ptr + i_bb * stride_qb + i_hh * stride_qh + o_n64[:, None] * stride_qn
    p_g0 = g_ptr + i_bb * stride_gb + i_hh * stride_gh + o_n64[:, None] * stride_gn
    b_den = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_qt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_q = tl.load(p_q0 + o_d[None, :].to(tl.int64) * stride_qd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_q = b_q.to(tl.float32)
        b_m = tl.load(m_ptr + i_bh * D + o_d, mask=m_d, other=0.0)
        b_t = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for v0 in range(0, DV, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < DV
            b_g = tl.load(p_g0 + o_v[None, :].to(tl.int64) * stride_gd, mask=m_n[:, None] & m_v[None, :], other=0.0)
            # Sᵀ tile: element (v, d) = S[d, v]
            p_st = s_ptr + i_bh * D * DV + o_d[None, :].to(tl.int64) * DV + o_v[:, None]
            b_st = tl.load(p_st, mask=m_v[:, None] & m_d[None, :], other=0.0)
            b_t = _dot(b_g, b_st, b_t, PRECISION)
        b_qt += tl.sum(b_q * b_t, 1)
        b_den += tl.sum(b_q * b_m[None, :], 1)
    inv = 1.0 / (b_den + eps)
    tl.store(inv_den_ptr + i_bh * N + o_n64, inv, mask=m_n)
    tl.store(dden_ptr + i_bh * N + o_n64, -b_qt * inv * inv, mask=m_n)


@triton.jit
def _power_map(z, gamma, m_d, eps):
    """``φ_γ(z)`` parts of a ``(BLOCK_N, BLOCK_D)`` tile of full rows: ``r``, ``ls = log2(r / max r)``,
    ``p = 2^(γ ls)``, ``n1 = ‖r‖``, ``n2 = ‖p‖`` (padding columns hold r = 0, p = 0)."""
    # NaN-propagating maxima: a NaN in z makes its row NaN, as torch's relu and norms do.
    r = tl.where(m_d[None, :], tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL) + eps, 0.0)
    r_max = tl.max(r, 1)
    ls = tl.log2(tl.maximum(r / r_max[:, None], F32_MIN_NORMAL, propagate_nan=tl.PropagateNan.ALL))
    p = tl.where(m_d[None, :], tl.exp2(gamma[:, None] * ls), 0.0)
    n1 = tl.sqrt(tl.sum(r * r, 1))
    n2 = tl.sqrt(tl.sum(p * p, 1))
    return r, ls, p, n1, n2


@triton.jit
def _power_map_grad(z, g, gamma, r, ls, p, n1, n2, m_d):
    """``(∂L/∂z, ∂L/∂γ)`` of ``φ_γ`` given ``G = ∂L/∂φ`` (the formulas with ``u = p / n2``).

    The projection ``G − u (G·u)`` is rebuilt from sums over the other entries, ``(g_i Σ_{j≠i} p_j² − p_i
    Σ_{j≠i} g_j p_j) / n2²``, with the sums split at ``p = 1/2`` (powers are relative to the row's largest ``r``,
    so the largest is ≈ 1): where one power dominates (large γ) the direct form cancels to a rounding error that
    the gradient multiplies by γ; here an entry leaves its own group's sum, a lone large entry exactly.
    """
    u = p / n2[:, None]
    own2 = p * p
    own_g = g * p
    # Each product in exactly one group, selected (not subtracted, which fp contraction could turn into an fma).
    large = p > 0.5
    l2 = tl.where(large, own2, 0.0)
    lg = tl.where(large, own_g, 0.0)
    s2 = tl.where(large, 0.0, own2)
    sg = tl.where(large, 0.0, own_g)
    large2 = tl.sum(l2, 1)
    large_g = tl.sum(lg, 1)
    small2 = tl.sum(s2, 1)
    small_g = tl.sum(sg, 1)
    gu = (small_g + large_g) / n2
    others2 = (small2[:, None] - s2) + (large2[:, None] - l2)
    others_g = (small_g[:, None] - sg) + (large_g[:, None] - lg)
    proj = (g * others2 - p * others_g) / (n2 * n2)[:, None]
    r_safe = tl.where(m_d[None, :], r, 1.0)
    dr = (gu / n1)[:, None] * r + (gamma * n1)[:, None] * (u / r_safe) * proj
    dz = tl.where(z > 0.0, dr, 0.0)
    dgamma = n1 * tl.sum(proj * u * ls, 1) * LN_2
    return dz, dgamma


@triton.jit(do_not_specialize=["N"])
def _features_kernel(
    z_ptr, za_ptr, g_ptr, ga_ptr, l_ptr, out_ptr,
    stride_zb, stride_zh, stride_zn, stride_zd,
    stride_ab, stride_ah, stride_an, stride_ad,
    stride_gb, stride_gh, stride_gn,
    stride_gab, stride_gah, stride_gan,
    stride_lb, stride_lh, stride_ln,
    N, H, D, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``Ẑ = φ_γ(z) − λ φ_γaux(z_aux)`` for a block of tokens (full rows), fp32 ``(B·H, N, D)``."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_bb = i_bh // H
    i_hh = i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < N
    m_d = o_d < D
    o_n64 = o_n.to(tl.int64)
    z = load_tile(z_ptr + i_bb * stride_zb + i_hh * stride_zh, o_n64, o_d, m_n, m_d, stride_zn, stride_zd)
    z = z.to(tl.float32)
    za = load_tile(za_ptr + i_bb * stride_ab + i_hh * stride_ah, o_n64, o_d, m_n, m_d, stride_an, stride_ad)
    za = za.to(tl.float32)
    gamma = tl.load(g_ptr + i_bb * stride_gb + i_hh * stride_gh + o_n64 * stride_gn, mask=m_n, other=1.0).to(tl.float32)
    gamma_a = tl.load(ga_ptr + i_bb * stride_gab + i_hh * stride_gah + o_n64 * stride_gan, mask=m_n, other=1.0)
    lam = tl.load(l_ptr + i_bb * stride_lb + i_hh * stride_lh + o_n64 * stride_ln, mask=m_n, other=0.0).to(tl.float32)
    r, ls, p, n1, n2 = _power_map(z, gamma, m_d, eps)
    ra, lsa, pa, n1a, n2a = _power_map(za, gamma_a.to(tl.float32), m_d, eps)
    feat = (n1 / n2)[:, None] * p - (lam * n1a / n2a)[:, None] * pa
    store_rows(out_ptr + i_bh * N * D, o_n64, m_n, D, D, feat, BLOCK_D)


@triton.jit(do_not_specialize=["N"])
def _features_bwd_kernel(
    z_ptr, za_ptr, g_ptr, ga_ptr, l_ptr, grad_ptr, dz_ptr, dza_ptr, dg_ptr, dga_ptr, dl_ptr,
    stride_zb, stride_zh, stride_zn, stride_zd,
    stride_ab, stride_ah, stride_an, stride_ad,
    stride_gb, stride_gh, stride_gn,
    stride_gab, stride_gah, stride_gan,
    stride_lb, stride_lh, stride_ln,
    N, H, D, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Back-propagates ``G = ∂L/∂Ẑ`` (fp32 ``(B·H, N, D)``) through the differential and both power maps: writes
    ``dz``, ``dz_aux`` (contiguous, the inputs' dtype) and ``dγ``, ``dγ_aux``, ``dλ`` (fp32 ``(B·H, N)``)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_bb = i_bh // H
    i_hh = i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < N
    m_d = o_d < D
    o_n64 = o_n.to(tl.int64)
    z = load_tile(z_ptr + i_bb * stride_zb + i_hh * stride_zh, o_n64, o_d, m_n, m_d, stride_zn, stride_zd)
    z = z.to(tl.float32)
    za = load_tile(za_ptr + i_bb * stride_ab + i_hh * stride_ah, o_n64, o_d, m_n, m_d, stride_an, stride_ad)
    za = za.to(tl.float32)
    gamma = tl.load(g_ptr + i_bb * stride_gb + i_hh * stride_gh + o_n64 * stride_gn, mask=m_n, other=1.0).to(tl.float32)
    gamma_a = tl.load(ga_ptr + i_bb * stride_gab + i_hh * stride_gah + o_n64 * stride_gan, mask=m_n, other=1.0)
    gamma_a = gamma_a.to(tl.float32)
    lam = tl.load(l_ptr + i_bb * stride_lb + i_hh * stride_lh + o_n64 * stride_ln, mask=m_n, other=0.0).to(tl.float32)
    o_tok = i_bh * N + o_n64
    g = load_tile(grad_ptr, o_tok, o_d, m_n, m_d, D, 1)
    r, ls, p, n1, n2 = _power_map(z, gamma, m_d, eps)
    ra, lsa, pa, n1a, n2a = _power_map(za, gamma_a, m_d, eps)
    # dφ(z) = G, dφ(z_aux) = −λ G, dλ = −G · φ(z_aux)
    dlam = -(n1a / n2a) * tl.sum(g * pa, 1)
    dz, dgamma = _power_map_grad(z, g, gamma, r, ls, p, n1, n2, m_d)
    dza, dgamma_a = _power_map_grad(za, -lam[:, None] * g, gamma_a, ra, lsa, pa, n1a, n2a, m_d)
    store_rows(dz_ptr, o_tok, m_n, D, D, dz, BLOCK_D)
    store_rows(dza_ptr, o_tok, m_n, D, D, dza, BLOCK_D)
    tl.store(dg_ptr + o_tok, dgamma, mask=m_n)
    tl.store(dga_ptr + o_tok, dgamma_a, mask=m_n)
    tl.store(dl_ptr + o_tok, dlam, mask=m_n)


# ------------------------------------------------------------------------------------------------ launchers


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are plenty


def _block(n: int, cap: int) -> int:
    """A power-of-two tile >= 16 (tl.dot's minimum) covering ``n``, at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _splits(cfg: Config, n: int, bh: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """``(splits, tokens per split)`` of the state reduction: about two programs per SM, whole token blocks."""
    if cfg.splits is not None:
        wanted = cfg.splits
    else:
        wanted = triton.cdiv(2 * _num_sms(device), bh * tiles)
    blocks = triton.cdiv(n, cfg.block_n)
    per_split = triton.cdiv(blocks, max(1, min(wanted, blocks))) * cfg.block_n
    return triton.cdiv(n, per_split), per_split


def _reduce(a, b, scale, weight, *, colsum: bool, precision: str, cfg: Config):
    """``(Σ_n a_nᵀ (s_n b_n), Σ_n w_n a_n)`` per batch·head over all tokens: fp32 ``(B·H, DA, DB)``, ``(B·H, DA)``."""
    B, H, N, DA = a.shape
    DB = b.shape[3]
    block_a, block_b = _block(DA, cfg.block_d), _block(DB, cfg.block_d)
    tiles = triton.cdiv(DA, block_a) * triton.cdiv(DB, block_b)
    splits, per_split = _splits(cfg, N, B * H, tiles, a.device)
    part = torch.empty(B * H, splits, DA, DB, dtype=torch.float32, device=a.device)
    col = torch.zeros(B * H, splits, DA, dtype=torch.float32, device=a.device)
    dummy = part
    _state_kernel[(tiles, splits, B * H)](
        a, b, dummy if scale is None else scale, dummy if weight is None else weight, part, col,
        *_strides4(a), *_strides4(b),
        N, H, DA, DB, per_split,
        BLOCK_N=cfg.block_n, BLOCK_A=block_a, BLOCK_B=block_b,
        ROW_SCALE=scale is not None, COLSUM=colsum, WEIGHTED=weight is not None, PRECISION=precision,
        num_warps=cfg.num_warps,
    )
    return part.sum(1), col.sum(1)


def _readout(x, m, m_strides, out, *, scale=None, alpha=1.0, coef=None, beta=0.0, den_vec=None, add_vec=None,
             eps=0.0, precision: str, cfg: Config):
    """``out = (x M) · s + c · vec`` (see ``_readout_kernel``); ``m``: fp32 ``(B·H, C, O)`` read with ``m_strides``."""
    B, H, N, C = x.shape
    O = out.shape[3]
    block_c, block_o = _block(C, cfg.block_d), _block(O, cfg.block_d)
    dummy = m
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(O, block_o), B * H)
    _readout_kernel[grid](
        x, m, out, dummy if scale is None else scale, dummy if coef is None else coef,
        dummy if den_vec is None else den_vec, dummy if add_vec is None else add_vec,
        *_strides4(x), *m_strides, *_strides4(out),
        N, H, C, O, float(alpha), float(beta), float(eps),
        BLOCK_N=cfg.block_n, BLOCK_C=block_c, BLOCK_O=block_o,
        ROW_SCALE=scale is not None, NORM_DEN=den_vec is not None, ADD_VEC=add_vec is not None,
        COEF=coef is not None, PRECISION=precision, num_warps=cfg.num_warps,
    )
    return out


def _core_fwd(q, k, v, normalize: bool, eps: float, out_dtype: torch.dtype, precision: str, cfg: Config):
    B, H, N, D = q.shape
    Dv, num_keys = v.shape[3], k.shape[2]
    s_sum, k_sum = _reduce(k, v, None, None, colsum=True, precision=precision, cfg=cfg)
    state, ksum = s_sum / num_keys, k_sum / num_keys
    out = torch.empty(B, H, N, Dv, dtype=out_dtype, device=q.device)
    _readout(q, state, (Dv, 1), out, den_vec=ksum if normalize else None, eps=eps, precision=precision, cfg=cfg)
    return out, state.view(B, H, D, Dv), ksum.view(B, H, D)


def _core_bwd(q, k, v, state, ksum, dout, normalize: bool, eps: float, feature_dtype, value_dtype, precision: str,
              cfg: Config):
    """``(dq, dk, dv)`` of the linear core; ``dq``, ``dk`` in ``feature_dtype``, ``dv`` in ``value_dtype``. ``S`` is
    a mean over the ``Nk`` keys, so the key-side gradients carry ``1/Nk``."""
    B, H, N, D = q.shape
    Dv, num_keys = v.shape[3], k.shape[2]
    state = state.reshape(B * H, D, Dv).contiguous()
    ksum = ksum.reshape(B * H, D).contiguous()
    inv_den = dden = None
    if normalize:
        inv_den = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
        dden = torch.empty_like(inv_den)
        block_d, block_v = _block(D, cfg.block_d), _block(Dv, cfg.block_d)
        _norm_bwd_kernel[(triton.cdiv(N, cfg.block_n), B * H)](
            q, dout, state, ksum, inv_den, dden, *_strides4(q), *_strides4(dout), N, H, D, Dv, float(eps),
            BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_V=block_v, PRECISION=precision, num_warps=cfg.num_warps,
        )
    ds, dm = _reduce(q, dout, inv_den, dden, colsum=normalize, precision=precision, cfg=cfg)
    dq = torch.empty(q.shape, dtype=feature_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=feature_dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=value_dtype, device=q.device)
    # dQ̂ = g Sᵀ · inv_den + dden · m ; Sᵀ[c = v, o = d] = S[d, v]
    _readout(dout, state, (1, Dv), dq, scale=inv_den, coef=dden, add_vec=ksum if normalize else None,
             precision=precision, cfg=cfg)
    # dK̂ = (V dSᵀ + dm) / Nk ; dV = K̂ dS / Nk
    _readout(v, ds, (1, Dv), dk, alpha=1.0 / num_keys, beta=1.0 / num_keys, add_vec=dm if normalize else None,
             precision=precision, cfg=cfg)
    _readout(k, ds, (Dv, 1), dv, alpha=1.0 / num_keys, precision=precision, cfg=cfg)
    return dq, dk, dv


def linear_fwd(q, k, v, normalize: bool, eps: float, cfg: Config = Config()):
    """Linear attention: ``(out, state (B, H, D, Dv) fp32, ksum (B, H, D) fp32)``."""
    return _core_fwd(q, k, v, normalize, eps, q.dtype, matmul_precision(q.dtype), cfg)


def linear_bwd(q, k, v, state, ksum, dout, normalize: bool, eps: float, cfg: Config = Config()):
    """``(dq, dk, dv)`` of linear attention, in q's dtype."""
    return _core_bwd(q, k, v, state, ksum, dout, normalize, eps, q.dtype, q.dtype, matmul_precision(q.dtype), cfg)


def _feature_blocks(D: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)`` of the prologue: full rows, about 1024 elements per tile (some ten tiles
    are live at once; more would spill registers)."""
    block_d = triton.next_power_of_2(D)
    return max(1, min(16, 1024 // block_d)), block_d, 4 if block_d <= 512 else 8


def _per_token_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return tuple(t.stride())


def _features(z, z_aux, gamma, gamma_aux, lam, eps: float):
    """DyDiLA's prologue for one side: ``Ẑ`` fp32 ``(B, H, N, D)``."""
    B, H, N, D = z.shape
    out = torch.empty(B, H, N, D, dtype=torch.float32, device=z.device)
    block_n, block_d, warps = _feature_blocks(D)
    _features_kernel[(triton.cdiv(N, block_n), B * H)](
        z, z_aux, gamma, gamma_aux, lam, out,
        *_strides4(z), *_strides4(z_aux), *_per_token_strides(gamma), *_per_token_strides(gamma_aux),
        *_per_token_strides(lam), N, H, D, float(eps), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _features_bwd(z, z_aux, gamma, gamma_aux, lam, grad, eps: float):
    """``(dz, dz_aux, dγ, dγ_aux, dλ)`` of one side from ``grad = ∂L/∂Ẑ`` (fp32, contiguous)."""
    B, H, N, D = z.shape
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dza = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    per_token = [torch.empty(B, H, N, dtype=torch.float32, device=z.device) for _ in range(3)]
    block_n, block_d, warps = _feature_blocks(D)
    _features_bwd_kernel[(triton.cdiv(N, block_n), B * H)](
        z, z_aux, gamma, gamma_aux, lam, grad.contiguous(), dz, dza, *per_token,
        *_strides4(z), *_strides4(z_aux), *_per_token_strides(gamma), *_per_token_strides(gamma_aux),
        *_per_token_strides(lam), N, H, D, float(eps), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return (dz, dza, *per_token)


def dydila_fwd(q, k, v, q_aux, k_aux, params, normalize: bool, eps: float, cfg: Config = Config()):
    """DyDiLA: ``(out, state, ksum)``; ``params = (γq, γk, γq_aux, γk_aux, λq, λk)``, each ``(B, H, N)``."""
    gq, gk, gqa, gka, lq, lk = params
    q_hat = _features(q, q_aux, gq, gqa, lq, eps)
    k_hat = _features(k, k_aux, gk, gka, lk, eps)
    return _core_fwd(q_hat, k_hat, v, normalize, eps, q.dtype, matmul_precision(q.dtype), cfg)


def dydila_bwd(q, k, v, q_aux, k_aux, params, state, ksum, dout, normalize: bool, eps: float, cfg: Config = Config()):
    """``(dq, dk, dv, dq_aux, dk_aux, dγq, dγk, dγq_aux, dγk_aux, dλq, dλk)``; per-token gradients in fp32."""
    gq, gk, gqa, gka, lq, lk = params
    q_hat = _features(q, q_aux, gq, gqa, lq, eps)
    k_hat = _features(k, k_aux, gk, gka, lk, eps)
    dq_hat, dk_hat, dv = _core_bwd(q_hat, k_hat, v, state, ksum, dout, normalize, eps, torch.float32, q.dtype,
                                   matmul_precision(q.dtype), cfg)
    dq, dq_aux, dgq, dgqa, dlq = _features_bwd(q, q_aux, gq, gqa, lq, dq_hat, eps)
    dk, dk_aux, dgk, dgka, dlk = _features_bwd(k, k_aux, gk, gka, lk, dk_hat, eps)
    return dq, dk, dv, dq_aux, dk_aux, dgq, dgk, dgqa, dgka, dlq, dlk
