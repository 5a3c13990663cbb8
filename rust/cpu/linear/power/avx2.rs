//! The AVX2+FMA clones of [`super::power_rows`] and [`super::power_rows_grad`], written with intrinsics: `vmath`'s
//! `log2` / `exp2` (the same operations in the same order per lane; lane sums in tree order), `STEP` vectors at a
//! time so their long dependency chains interleave (a single vector's `log2` → `exp2` chain leaves the pipes
//! mostly idle: on the Zen-class test machine 4 vectors per step ran a row 1.2× faster than 2), with the exponent
//! bit tricks folded into fewer integer operations. Tails go through padded copies (AMD's masked stores are slow).

use std::arch::x86_64::*;

use super::Norms;
use crate::cpu::vmath::{log2_one, EXP2_P, LOG2_P, ROUND_MAGIC, SQRT_HALF_BITS};

const W: usize = 8;
/// Vectors per step of the main loops.
const STEP: usize = 4;
/// How many rows ahead [`power_rows`] prefetches its input.
const PREFETCH_ROWS: usize = 16;
/// `ROUND_MAGIC + 127`: `x + EXP2_MAGIC` holds `round(x) + 127` in its low mantissa bits, so shifting its bits
/// left by 23 gives the bits of `2^round(x)` directly (0 for −127).
const EXP2_MAGIC: f32 = ROUND_MAGIC + 127.0;

/// Every value of `c` broadcast to a vector.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn splat<const K: usize>(c: [f32; K]) -> [__m256; K] {
    let mut v = [_mm256_setzero_ps(); K];
    for (v, c) in v.iter_mut().zip(c) {
        *v = _mm256_set1_ps(c);
    }
    v
}

/// `log2 x` of `N` vectors, `x` positive, normal and finite, as `vmath::log2_one`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn log2_v<const N: usize>(x: [__m256; N]) -> [__m256; N] {
    let c = splat(LOG2_P);
    let one = _mm256_set1_ps(1.0);
    let mut out = [one; N];
    for j in 0..N {
        let bits = _mm256_castps_si256(x[j]);
        let folded = _mm256_srai_epi32::<23>(_mm256_sub_epi32(bits, _mm256_set1_epi32(SQRT_HALF_BITS)));
        let m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32::<23>(folded)));
        let s = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
        let s2 = _mm256_mul_ps(s, s);
        let mut p = c[0];
        for coef in &c[1..] {
            p = _mm256_fmadd_ps(p, s2, *coef);
        }
        out[j] = _mm256_fmadd_ps(s, p, _mm256_cvtepi32_ps(folded));
    }
    out
}

/// `2^x` of `N` vectors, clamped to [−127, 127] (−127 and below give 0), as `vmath::exp2_one`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp2_v<const N: usize>(x: [__m256; N]) -> [__m256; N] {
    let c = splat(EXP2_P);
    let magic = _mm256_set1_ps(EXP2_MAGIC);
    let (mut f, mut scale) = ([magic; N], [magic; N]);
    for j in 0..N {
        let x = _mm256_min_ps(_mm256_set1_ps(127.0), _mm256_max_ps(_mm256_set1_ps(-127.0), x[j]));
        let t = _mm256_add_ps(x, magic);
        f[j] = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
        scale[j] = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(t)));
    }
    let mut p = [c[0]; N];
    for coef in &c[1..] {
        for j in 0..N {
            p[j] = _mm256_fmadd_ps(p[j], f[j], *coef);
        }
    }
    for j in 0..N {
        p[j] = _mm256_mul_ps(_mm256_fmadd_ps(f[j], p[j], _mm256_set1_ps(1.0)), scale[j]);
    }
    p
}

/// Lanes `< len` set (all bits).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tail_mask(len: usize) -> __m256 {
    _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
}

/// `tail` (fewer than 8 values) followed by `fill`.
fn padded(tail: &[f32], fill: f32) -> __m256 {
    let mut lanes = [fill; W];
    lanes[..tail.len()].copy_from_slice(tail);
    // SAFETY: `[f32; 8]` and `__m256` have the same size, and every bit pattern is valid for both.
    unsafe { std::mem::transmute::<[f32; W], __m256>(lanes) }
}

fn to_lanes(v: __m256) -> [f32; W] {
    // SAFETY: `__m256` and `[f32; 8]` have the same size, and every bit pattern is a valid f32.
    unsafe { std::mem::transmute(v) }
}

/// Sum of the 8 lanes (a tree, not `lanes_sum`'s order: the vector path is checked to tolerance, not bits).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// Largest of the 8 lanes (no NaN among them).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)))
}

/// The first `N·8` values of `src` as `N` vectors (panics if it holds fewer).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn load_v<const N: usize>(src: &[f32]) -> [__m256; N] {
    let src = &src[..N * W];
    let mut v = [_mm256_setzero_ps(); N];
    for (j, v) in v.iter_mut().enumerate() {
        // SAFETY: `src` holds `N·8` values, so the 8 from `j·8` (`j < N`) are inside it.
        *v = unsafe { _mm256_loadu_ps(src.as_ptr().add(j * W)) };
    }
    v
}

/// Writes `N` vectors to the first `N·8` values of `dst` (panics if it holds fewer).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn store_v<const N: usize>(dst: &mut [f32], v: [__m256; N]) {
    let dst = &mut dst[..N * W];
    for (j, v) in v.iter().enumerate() {
        // SAFETY: `dst` holds `N·8` values, so the 8 from `j·8` (`j < N`) are inside it.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(j * W), *v) };
    }
}

/// Pass 1 of one row (see `super::relu_row`): `r = max(relu(z) + ε, f32::MIN_POSITIVE)` into `r_out`; returns
/// `(‖r‖, max r)`.
#[target_feature(enable = "avx2,fma")]
fn relu_row(z: &[f32], eps: f32, r_out: &mut [f32]) -> (f32, f32) {
    let (zero, eps, tiny) = (_mm256_setzero_ps(), _mm256_set1_ps(eps), _mm256_set1_ps(f32::MIN_POSITIVE));
    // `max_ps` returns its second operand when either is NaN: `z` second, so a NaN z stays NaN (as in torch).
    let relu = |z: __m256| _mm256_max_ps(tiny, _mm256_add_ps(_mm256_max_ps(zero, z), eps));
    let (mut r2, mut rmax) = ([zero; STEP], [zero; STEP]);
    let mut zs = z.chunks_exact(STEP * W);
    let mut rs = r_out.chunks_exact_mut(STEP * W);
    for (zc, rc) in (&mut zs).zip(&mut rs) {
        let mut r = load_v::<STEP>(zc);
        for j in 0..STEP {
            r[j] = relu(r[j]);
            r2[j] = _mm256_fmadd_ps(r[j], r[j], r2[j]);
            rmax[j] = _mm256_max_ps(r[j], rmax[j]);
        }
        store_v(rc, r);
    }
    for (zc, rc) in zs.remainder().chunks(W).zip(rs.into_remainder().chunks_mut(W)) {
        // Vectors past the last full step, padded with zeros: a padded lane has r = max(ε, tiny) <= every r
        // (harmless in the maximum) and is masked out of the norm.
        let r = relu(padded(zc, 0.0));
        rc.copy_from_slice(&to_lanes(r)[..rc.len()]);
        let kept = _mm256_and_ps(r, tail_mask(rc.len()));
        r2[0] = _mm256_fmadd_ps(kept, kept, r2[0]);
        rmax[0] = _mm256_max_ps(r, rmax[0]);
    }
    let r2 = r2[1..].iter().fold(r2[0], |a, b| _mm256_add_ps(a, *b));
    let rmax = rmax[1..].iter().fold(rmax[0], |a, b| _mm256_max_ps(a, *b));
    (hsum(r2).sqrt(), hmax(rmax))
}

/// Pass 2 of one row (see `super::power_row`): `ls = log2 r` in place over `r`, `p = 2^(γ·(ls − shift))`; returns
/// `‖p‖`.
#[target_feature(enable = "avx2,fma")]
fn power_row(gamma: f32, shift: f32, ls: &mut [f32], p: &mut [f32]) -> f32 {
    let (g, offset) = (_mm256_set1_ps(gamma), _mm256_set1_ps(-gamma * shift));
    let power = |r: __m256| {
        let l = log2_v([r])[0];
        (l, exp2_v([_mm256_fmadd_ps(g, l, offset)])[0])
    };
    let mut p2 = [_mm256_setzero_ps(); STEP];
    let mut lss = ls.chunks_exact_mut(STEP * W);
    let mut ps = p.chunks_exact_mut(STEP * W);
    for (lc, pc) in (&mut lss).zip(&mut ps) {
        let r = load_v::<STEP>(lc);
        let l = log2_v(r);
        let mut x = l;
        for j in 0..STEP {
            x[j] = _mm256_fmadd_ps(g, l[j], offset);
        }
        let v = exp2_v(x);
        store_v(lc, l);
        store_v(pc, v);
        for j in 0..STEP {
            p2[j] = _mm256_fmadd_ps(v[j], v[j], p2[j]);
        }
    }
    for (lc, pc) in lss.into_remainder().chunks_mut(W).zip(ps.into_remainder().chunks_mut(W)) {
        // Padded with 1 (a finite log); the padded lanes are masked out of the norm.
        let (l, v) = power(padded(lc, 1.0));
        lc.copy_from_slice(&to_lanes(l)[..pc.len()]);
        pc.copy_from_slice(&to_lanes(v)[..pc.len()]);
        let v = _mm256_and_ps(v, tail_mask(pc.len()));
        p2[0] = _mm256_fmadd_ps(v, v, p2[0]);
    }
    hsum(p2[1..].iter().fold(p2[0], |a, b| _mm256_add_ps(a, *b))).sqrt()
}

/// [`super::power_rows`] with intrinsics: the same contract (checked by the caller).
#[target_feature(enable = "avx2,fma")]
pub fn power_rows(z: &[f32], gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    let d = z.len() / gamma.len().max(1);
    let rows = z.chunks_exact(d).zip(ls.chunks_exact_mut(d)).zip(p.chunks_exact_mut(d));
    for (((zr, lr), pr), (n, &g)) in rows.zip(norms.iter_mut().zip(gamma)) {
        // The row `PREFETCH_ROWS` ahead towards the cache: the rows stream in from memory, and waiting for them
        // made most of the time in situ (the address may lie past `z`: a prefetch never faults).
        for at in (0..d).step_by(16) {
            _mm_prefetch::<_MM_HINT_T0>(zr.as_ptr().wrapping_add(PREFETCH_ROWS * d + at).cast());
        }
        let (n1, rmax) = relu_row(zr, eps, lr);
        *n = (n1, power_row(g, log2_one::<true>(rmax), lr, pr));
    }
}

/// [`super::power_rows_grad`] with intrinsics: the same contract (checked by the caller).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub fn power_rows_grad(
    z: &[f32],
    g: &[f32],
    gamma: &[f32],
    eps: f32,
    ls: &[f32],
    p: &[f32],
    norms: &[Norms],
    dz: &mut [f32],
    dgamma: &mut [f32],
) {
    let d = z.len() / gamma.len().max(1);
    let rows = z.chunks_exact(d).zip(g.chunks_exact(d)).zip(ls.chunks_exact(d).zip(p.chunks_exact(d)));
    let per_row = gamma.iter().zip(norms).zip(dz.chunks_exact_mut(d).zip(dgamma.iter_mut()));
    for (((zr, gr), (lr, pr)), ((&ga, &n), (dzr, dg))) in rows.zip(per_row) {
        *dg = grad_row(zr, gr, ga, eps, lr, pr, n, dzr);
    }
}

/// `super::split_sums` with vectors: the same per-lane sums in the same order (tail entries into lane 0, lanes
/// summed first to last), so the result is bit-equal; the portable body's selects compiled to lane shuffles here.
#[target_feature(enable = "avx2,fma")]
pub(super) fn split_sums(g: &[f32], p: &[f32]) -> [f32; 4] {
    let (threshold, zero) = (_mm256_set1_ps(super::LARGE), _mm256_setzero_ps());
    let mut acc = [zero; 4];
    for (gc, pc) in g.chunks_exact(W).zip(p.chunks_exact(W)) {
        let [gv, pv] = [gc, pc].map(|c| load_v::<1>(c)[0]);
        let (own2, own_g) = (_mm256_mul_ps(pv, pv), _mm256_mul_ps(gv, pv));
        let large = _mm256_cmp_ps::<_CMP_GT_OQ>(pv, threshold);
        acc[0] = _mm256_add_ps(acc[0], _mm256_andnot_ps(large, own2));
        acc[1] = _mm256_add_ps(acc[1], _mm256_andnot_ps(large, own_g));
        acc[2] = _mm256_add_ps(acc[2], _mm256_and_ps(large, own2));
        acc[3] = _mm256_add_ps(acc[3], _mm256_and_ps(large, own_g));
    }
    let mut lanes = acc.map(to_lanes);
    let split = p.len() - p.len() % W;
    for (&gi, &pi) in g[split..].iter().zip(&p[split..]) {
        let (own2, own_g) = (pi * pi, gi * pi);
        let large = pi > super::LARGE;
        lanes[0][0] += if large { 0.0 } else { own2 };
        lanes[1][0] += if large { 0.0 } else { own_g };
        lanes[2][0] += if large { own2 } else { 0.0 };
        lanes[3][0] += if large { own_g } else { 0.0 };
    }
    lanes.map(|l| l.iter().sum())
}

/// `super::projection` per lane (the same operations in the same order).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn projection(gv: __m256, pv: __m256, sums: &[__m256; 4]) -> __m256 {
    let [small2, small_g, large2, large_g] = *sums;
    let (own2, own_g) = (_mm256_mul_ps(pv, pv), _mm256_mul_ps(gv, pv));
    let large = _mm256_cmp_ps::<_CMP_GT_OQ>(pv, _mm256_set1_ps(super::LARGE));
    let (l2, lg) = (_mm256_and_ps(own2, large), _mm256_and_ps(own_g, large));
    let others2 = _mm256_add_ps(_mm256_sub_ps(small2, _mm256_sub_ps(own2, l2)), _mm256_sub_ps(large2, l2));
    let others_g = _mm256_add_ps(_mm256_sub_ps(small_g, _mm256_sub_ps(own_g, lg)), _mm256_sub_ps(large_g, lg));
    _mm256_sub_ps(_mm256_mul_ps(gv, others2), _mm256_mul_ps(pv, others_g))
}

/// `∂L/∂z` and `∂L/∂γ` of one row, as `super::grad_row` (same operations in the same order, per lane).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
fn grad_row(z: &[f32], g: &[f32], gamma: f32, eps: f32, ls: &[f32], p: &[f32], norms: Norms, dz: &mut [f32]) -> f32 {
    let (n1, n2) = norms;
    let inv_n2 = 1.0 / n2;
    let sums = split_sums(g, p);
    let gu = (sums[1] + sums[3]) * inv_n2;
    let (a, b) = (_mm256_set1_ps(gu / n1), _mm256_set1_ps(gamma * n1));
    let (inv_n2_sq, sums) = (_mm256_set1_ps(inv_n2 * inv_n2), splat(sums));
    let (inv_n2, eps, zero) = (_mm256_set1_ps(inv_n2), _mm256_set1_ps(eps), _mm256_setzero_ps());
    let mut dgamma = zero;
    let mut step = |zv: __m256, gv: __m256, lv: __m256, pv: __m256| -> __m256 {
        let r = _mm256_add_ps(_mm256_max_ps(zv, zero), eps);
        let u = _mm256_mul_ps(pv, inv_n2);
        let proj = _mm256_mul_ps(projection(gv, pv, &sums), inv_n2_sq);
        let dr = _mm256_fmadd_ps(a, r, _mm256_mul_ps(_mm256_mul_ps(b, _mm256_div_ps(u, r)), proj));
        dgamma = _mm256_fmadd_ps(_mm256_mul_ps(proj, u), lv, dgamma);
        _mm256_and_ps(dr, _mm256_cmp_ps::<_CMP_GT_OQ>(zv, zero))
    };
    let split = z.len() - z.len() % W;
    let vectors = z.chunks_exact(W).zip(g.chunks_exact(W)).zip(ls.chunks_exact(W).zip(p.chunks_exact(W)));
    for (((zc, gc), (lc, pc)), dc) in vectors.zip(dz.chunks_exact_mut(W)) {
        let [zv, gv, lv, pv] = [zc, gc, lc, pc].map(|c| load_v::<1>(c)[0]);
        store_v(dc, [step(zv, gv, lv, pv)]);
    }
    if split < z.len() {
        // Zero-padded tails: padded lanes have r = ε > 0 and u = 0, so they add 0 to dγ.
        let [zv, gv, lv, pv] = [z, g, ls, p].map(|row| padded(&row[split..], 0.0));
        let mut out = [0.0; W];
        store_v(&mut out, [step(zv, gv, lv, pv)]);
        dz[split..].copy_from_slice(&out[..z.len() - split]);
    }
    n1 * hsum(dgamma) * std::f32::consts::LN_2
}
