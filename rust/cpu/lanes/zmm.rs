//! The 16-lane clones of [`super`]'s products and lane loops, written with AVX-512 vectors: one `__m512` per
//! `Lanes` (the 16 queries of a tile), or per 16 channels in [`update_block`]. Left to the vectorizer, the
//! `[f32; 16]` arrays of the AVX-512 clone became gathers and scatters across rows of lanes; here every load and
//! store is a whole vector. Each function does the same operations in the same order per lane as its portable
//! twin with FMA (the portable body is the reference of the tests).

use std::arch::x86_64::*;

use super::{Lanes, PairLanes, LANES};
use crate::cpu::vmath::{EXP2_P, ROUND_MAGIC};

#[inline]
#[target_feature(enable = "avx512f")]
fn ld(x: &[f32]) -> __m512 {
    let x = &x[..LANES];
    // SAFETY: `x` holds 16 values (the slicing above checks it), the width of one unaligned load.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn st(x: &mut [f32], v: __m512) {
    let x = &mut x[..LANES];
    // SAFETY: `x` holds 16 values (the slicing above checks it), the width of one unaligned store.
    unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
}

/// `super::dots_block`: `out[i] = Σ_c a[c] · rows[i][c]`, `i < NB`, every row as long as `a`.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn dots_block<const NB: usize>(a: &[Lanes], rows: [&[f32]; NB], out: &mut [Lanes]) {
    let c_len = a.len();
    assert!(rows.iter().all(|r| r.len() == c_len));
    let ptrs = rows.map(|r| r.as_ptr());
    let chains = super::dot_chains(NB);
    let mut acc = [[_mm512_setzero_ps(); 4]; NB];
    let mut fma = |c: usize, chain: usize, av: __m512| {
        for i in 0..NB {
            // SAFETY: `c < a.len()`, the length of every row (asserted above).
            let x = unsafe { *ptrs[i].add(c) };
            acc[i][chain] = _mm512_fmadd_ps(_mm512_set1_ps(x), av, acc[i][chain]);
        }
    };
    let whole = c_len - c_len % chains;
    for c0 in (0..whole).step_by(chains) {
        for chain in 0..chains {
            fma(c0 + chain, chain, ld(&a[c0 + chain]));
        }
    }
    for c in whole..c_len {
        fma(c, c % chains, ld(&a[c]));
    }
    for (o, parts) in out[..NB].iter_mut().zip(acc) {
        let v = match chains {
            1 => parts[0],
            2 => _mm512_add_ps(parts[0], parts[1]),
            _ => _mm512_add_ps(_mm512_add_ps(parts[0], parts[1]), _mm512_add_ps(parts[2], parts[3])),
        };
        st(o, v);
    }
}

/// `super::dots_bf16`'s block: `out[i] = Σ_p dot2(a[p], rows[i][2p..2p + 2])`, `i < NB`, every row holding
/// `2·a.len()` bf16 values (bits); pairs multiplied exactly and summed in f32 by `vdpbf16ps`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn dots_bf16_block<const NB: usize>(a: &[PairLanes], rows: [&[u16]; NB], out: &mut [Lanes]) {
    let pairs = a.len();
    assert!(rows.iter().all(|r| r.len() == 2 * pairs));
    let ptrs = rows.map(|r| r.as_ptr());
    // Split accumulators for blocks of 1 or 2 keys, as in `dots_block` (pair `p` into chain `p % chains`).
    let chains = super::dot_chains(NB);
    let mut acc = [[_mm512_setzero_ps(); 4]; NB];
    let mut dot = |p: usize, chain: usize| {
        // SAFETY: `a[p]` holds 16 u32, one vector; `__m512i` and `__m512bh` are 64 plain bytes.
        let av: __m512bh = unsafe { std::mem::transmute(_mm512_loadu_si512(a[p].as_ptr().cast())) };
        for i in 0..NB {
            // SAFETY: `2p + 1 < 2·a.len()`, the length of every row (asserted above); an unaligned read of the two
            // bf16 values of the pair.
            let pair = unsafe { ptrs[i].add(2 * p).cast::<u32>().read_unaligned() };
            // SAFETY: `__m512i` and `__m512bh` are 64 plain bytes, any bit pattern valid in both.
            let b: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair as i32)) };
            acc[i][chain] = _mm512_dpbf16_ps(acc[i][chain], av, b);
        }
    };
    let whole = pairs - pairs % chains;
    for p0 in (0..whole).step_by(chains) {
        for chain in 0..chains {
            dot(p0 + chain, chain);
        }
    }
    for p in whole..pairs {
        dot(p, p % chains);
    }
    for (o, parts) in out[..NB].iter_mut().zip(acc) {
        let v = match chains {
            1 => parts[0],
            2 => _mm512_add_ps(parts[0], parts[1]),
            _ => _mm512_add_ps(_mm512_add_ps(parts[0], parts[1]), _mm512_add_ps(parts[2], parts[3])),
        };
        st(o, v);
    }
}

/// `super::pair_key_lanes`' step: lane `l` of the result holds `lo[l]` (low half) and `hi[l]` (high half) rounded to
/// bf16 (to nearest even).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn bf16_pair(lo: &Lanes, hi: &Lanes, out: &mut PairLanes) {
    // SAFETY: `__m256bh` and `__m256i` are 32 plain bytes, any bit pattern valid in both.
    let widen = |x: __m256bh| _mm512_cvtepu16_epi32(unsafe { std::mem::transmute::<__m256bh, __m256i>(x) });
    let (lo, hi) = (widen(_mm512_cvtneps_pbh(ld(lo))), widen(_mm512_cvtneps_pbh(ld(hi))));
    let pairs = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
    // SAFETY: `out` holds 16 u32, one unaligned 64-byte store.
    unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), pairs) }
}

/// `super::combine_bf16`'s block: `acc[i] += Σ_m dot2(w[m], pairs[m·stride + i])`, `i < CB`, the pairs' products
/// exact and summed in f32 by `vdpbf16ps`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn combine_bf16_block<const CB: usize>(w: &[PairLanes], pairs: &[u32], stride: usize, acc: &mut [Lanes]) {
    let acc = &mut acc[..CB];
    let mut a = [_mm512_setzero_ps(); CB];
    for (a, x) in a.iter_mut().zip(acc.iter()) {
        *a = ld(x);
    }
    for (m, wv) in w.iter().enumerate() {
        let row = &pairs[m * stride..][..CB];
        // SAFETY: `wv` holds 16 u32, one vector; `__m512i` and `__m512bh` are 64 plain bytes.
        let wv: __m512bh = unsafe { std::mem::transmute(_mm512_loadu_si512(wv.as_ptr().cast())) };
        for i in 0..CB {
            // SAFETY: `__m512i` and `__m512bh` are 64 plain bytes, any bit pattern valid in both.
            let b: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(row[i] as i32)) };
            a[i] = _mm512_dpbf16_ps(a[i], wv, b);
        }
    }
    for (x, v) in acc.iter_mut().zip(a) {
        st(x, v);
    }
}

/// `super::lane_pairs`' step: the 16 lanes of `row` rounded to bf16 (to nearest even), lanes `2i`, `2i + 1` in
/// the low and high half of `out[i]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn bf16_lanes(row: &Lanes, out: &mut [u32; LANES / 2]) {
    let bits = _mm512_cvtneps_pbh(ld(row));
    // SAFETY: `out` holds 8 u32 (32 bytes), one unaligned store of the 16 bf16 values; `__m256bh` and `__m256i`
    // are 32 plain bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), std::mem::transmute::<__m256bh, __m256i>(bits)) }
}

/// `super::update_bf16`'s block: `dst[jj·stride + c] += Σ_i dot2(w[jj][i], b[i·width + c])` for `jj < JB`,
/// `c < 16·VB`, `i < 8` (pairs of lanes), the products exact and summed in f32 by `vdpbf16ps`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub fn update_bf16_block<const JB: usize, const VB: usize>(
    w: &[[u32; LANES / 2]],
    b: &[u32],
    width: usize,
    dst: &mut [f32],
    stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); VB]; JB];
    for (jj, a) in acc.iter_mut().enumerate() {
        for (v, av) in a.iter_mut().enumerate() {
            *av = ld(&dst[jj * stride + v * LANES..]);
        }
    }
    for i in 0..LANES / 2 {
        let row = &b[i * width..][..VB * LANES];
        for v in 0..VB {
            let bv = &row[v * LANES..][..LANES];
            // SAFETY: `bv` holds 16 u32, one unaligned vector; `__m512i` and `__m512bh` are 64 plain bytes.
            let bv: __m512bh = unsafe { std::mem::transmute(_mm512_loadu_si512(bv.as_ptr().cast())) };
            for jj in 0..JB {
                // SAFETY: `__m512i` and `__m512bh` are 64 plain bytes, any bit pattern valid in both.
                let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(w[jj][i] as i32)) };
                acc[jj][v] = _mm512_dpbf16_ps(acc[jj][v], a, bv);
            }
        }
    }
    for (jj, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            st(&mut dst[jj * stride + v * LANES..], *av);
        }
    }
}

/// `super::combine_block`: `acc[i] += Σ_j w[j] · rows[j·stride + i]`, `i < CB`.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn combine_block<const CB: usize>(w: &[Lanes], rows: &[f32], stride: usize, acc: &mut [Lanes]) {
    combine_runs_block::<CB>(w, &[(0, 0, w.len())], rows, stride, acc)
}

/// `super::combine_runs`' block: `acc[i] += Σ_runs Σ_j w[slot + j] · rows[(start + j)·stride + i]`, `i < CB`, the
/// accumulators in registers across all runs.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn combine_runs_block<const CB: usize>(w: &[Lanes], runs: &[(usize, usize, usize)], rows: &[f32], stride: usize, acc: &mut [Lanes]) {
    let acc = &mut acc[..CB];
    let mut a = [_mm512_setzero_ps(); CB];
    for (a, x) in a.iter_mut().zip(acc.iter()) {
        *a = ld(x);
    }
    for &(start, slot, len) in runs {
        let rows = &rows[start * stride..];
        for (j, wv) in w[slot..slot + len].iter().enumerate() {
            let (row, wv) = (&rows[j * stride..][..CB], ld(wv));
            for i in 0..CB {
                a[i] = _mm512_fmadd_ps(_mm512_set1_ps(row[i]), wv, a[i]);
            }
        }
    }
    for (x, v) in acc.iter_mut().zip(a) {
        st(x, v);
    }
}

/// `super::update_block` with 16-channel vectors: `dst[jj·stride + c] += Σ_l w[jj][l] · b[l·width + c]` for
/// `jj < JB`, `c < 16·VB`.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn update_block<const JB: usize, const VB: usize>(
    w: &[Lanes],
    b: &[f32],
    width: usize,
    dst: &mut [f32],
    stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); VB]; JB];
    for (jj, a) in acc.iter_mut().enumerate() {
        for (v, av) in a.iter_mut().enumerate() {
            *av = ld(&dst[jj * stride + v * LANES..]);
        }
    }
    for l in 0..LANES {
        let row = &b[l * width..][..VB * LANES];
        for v in 0..VB {
            let bv = ld(&row[v * LANES..]);
            for jj in 0..JB {
                acc[jj][v] = _mm512_fmadd_ps(_mm512_set1_ps(w[jj][l]), bv, acc[jj][v]);
            }
        }
    }
    for (jj, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            st(&mut dst[jj * stride + v * LANES..], *av);
        }
    }
}

/// `super::mask_columns`: −∞ outside `[lo, hi]` per lane (a NaN bound keeps nothing, as the comparisons there).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn mask_columns(s: &mut [Lanes], x0: f32, lo: &Lanes, hi: &Lanes) {
    let (lo, hi, minus_inf) = (ld(lo), ld(hi), _mm512_set1_ps(f32::NEG_INFINITY));
    for (i, row) in s.iter_mut().enumerate() {
        let x = _mm512_set1_ps(x0 + i as f32);
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, hi);
        let kept = _mm512_mask_blend_ps(keep, minus_inf, ld(row));
        st(row, kept);
    }
}

/// `super::max_lanes` (`max_ps(row, m)` is `row > m ? row : m`, NaN rows skipped, as there).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn max_lanes(s: &[Lanes]) -> Lanes {
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for row in s {
        m = _mm512_max_ps(ld(row), m);
    }
    let mut out = [0.0; LANES];
    st(&mut out, m);
    out
}

/// `vmath::exp2_one` per lane: the same clamp (NaN passes), rounding, polynomial and exponent bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp2(x: __m512) -> __m512 {
    // `max_ps`/`min_ps` return their second operand when either is NaN: `x` second, so a NaN stays NaN.
    let x = _mm512_min_ps(_mm512_set1_ps(127.0), _mm512_max_ps(_mm512_set1_ps(-127.0), x));
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let t = _mm512_add_ps(x, magic);
    let f = _mm512_sub_ps(x, _mm512_sub_ps(t, magic));
    let mut p = _mm512_set1_ps(EXP2_P[0]);
    for c in &EXP2_P[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    let bias = _mm512_set1_epi32(ROUND_MAGIC.to_bits() as i32 - 127);
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_sub_epi32(_mm512_castps_si512(t), bias)));
    _mm512_mul_ps(_mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0)), scale)
}

/// `super::exp2_shift`: `s[j] = 2^(s[j] − shift)` in place; returns the lane-wise sums.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn exp2_shift(s: &mut [Lanes], shift: &Lanes) -> Lanes {
    let (shift, mut sum) = (ld(shift), _mm512_setzero_ps());
    for row in s.iter_mut() {
        let p = exp2(_mm512_sub_ps(ld(row), shift));
        st(row, p);
        sum = _mm512_add_ps(sum, p);
    }
    let mut out = [0.0; LANES];
    st(&mut out, sum);
    out
}

/// `super::scale_rows`: `rows[j] *= by` lane-wise.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn scale_rows(rows: &mut [Lanes], by: &Lanes) {
    let by = ld(by);
    for row in rows.iter_mut() {
        let scaled = _mm512_mul_ps(ld(row), by);
        st(row, scaled);
    }
}

/// `super::softmax_grad`: `ds[j] = p[j] · (ds[j] − delta)` lane-wise.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn softmax_grad(ds: &mut [Lanes], p: &[Lanes], delta: &Lanes) {
    let delta = ld(delta);
    for (d, p) in ds.iter_mut().zip(p) {
        let grad = _mm512_mul_ps(ld(p), _mm512_sub_ps(ld(d), delta));
        st(d, grad);
    }
}

/// The 16×16 transpose of `r` (vector `i` of the result holds element `i` of every input vector, in order).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512; LANES]) -> [__m512; LANES] {
    let (lo64, hi64) = (
        |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
        |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
    );
    let mut t = [_mm512_setzero_ps(); LANES];
    for k in 0..LANES / 2 {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    let mut u = [_mm512_setzero_ps(); LANES];
    for b in (0..LANES).step_by(4) {
        u[b] = lo64(t[b], t[b + 2]);
        u[b + 1] = hi64(t[b], t[b + 2]);
        u[b + 2] = lo64(t[b + 1], t[b + 3]);
        u[b + 3] = hi64(t[b + 1], t[b + 3]);
    }
    for b in [0, 8] {
        for i in b..b + 4 {
            t[i] = _mm512_shuffle_f32x4::<0x88>(u[i], u[i + 4]);
            t[i + 4] = _mm512_shuffle_f32x4::<0xdd>(u[i], u[i + 4]);
        }
    }
    for i in 0..LANES / 2 {
        u[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        u[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
    }
    u
}

/// The first `n ≤ 16` values of `x` in a vector, zeros after.
#[inline]
#[target_feature(enable = "avx512f")]
fn ld_head(x: &[f32], n: usize) -> __m512 {
    let x = &x[..n];
    // SAFETY: the mask enables the first `n` lanes only, all inside `x` (the slicing above checks it); masked-off
    // lanes are not read.
    unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, x.as_ptr()) }
}

/// Stores the first `n ≤ 16` lanes of `v` into `x`.
#[inline]
#[target_feature(enable = "avx512f")]
fn st_head(x: &mut [f32], n: usize, v: __m512) {
    let x = &mut x[..n];
    // SAFETY: the mask enables the first `n` lanes only, all inside `x` (the slicing above checks it); masked-off
    // lanes are not written.
    unsafe { _mm512_mask_storeu_ps(x.as_mut_ptr(), ((1u32 << n) - 1) as __mmask16, v) }
}

/// `super::rows_to_lanes`: `out[c][l] = rows[l·stride + c]·mul` for `l < live`, 0 for `l ≥ live`.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn rows_to_lanes(rows: &[f32], stride: usize, live: usize, mul: f32, out: &mut [Lanes]) {
    let mul = _mm512_set1_ps(mul);
    for c0 in (0..out.len()).step_by(LANES) {
        let n = (out.len() - c0).min(LANES);
        let r: [__m512; LANES] = std::array::from_fn(|l| if l < live { ld_head(&rows[l * stride + c0..], n) } else { _mm512_setzero_ps() });
        for (o, v) in out[c0..c0 + n].iter_mut().zip(transpose(r)) {
            st(o, _mm512_mul_ps(v, mul));
        }
    }
}

/// `super::lanes_to_rows`: `rows[l·stride + c] = lanes[c][l]·by[l]` for `l < live`.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn lanes_to_rows(lanes: &[Lanes], by: &Lanes, live: usize, rows: &mut [f32], stride: usize) {
    for c0 in (0..lanes.len()).step_by(LANES) {
        let n = (lanes.len() - c0).min(LANES);
        let r: [__m512; LANES] = std::array::from_fn(|i| if i < n { ld(&lanes[c0 + i]) } else { _mm512_setzero_ps() });
        for (l, v) in transpose(r).into_iter().enumerate().take(live) {
            st_head(&mut rows[l * stride + c0..], n, _mm512_mul_ps(v, _mm512_set1_ps(by[l])));
        }
    }
}
