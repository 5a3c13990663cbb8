//! The AVX2+FMA clones of [`super::power_rows`] and [`super::power_rows_grad`], written with intrinsics: `vmath`'s `log2` / `exp2`
//! polynomials (the same operations in the same order), `STEP` vectors at a time so their long dependency chains
//! interleave, with the exponent bit tricks folded into fewer integer operations. Tails shorter than a vector go
//! through zero-padded copies (AMD's masked stores are slow).

use std::arch::x86_64::*;

use super::{lanes_max, lanes_sum, Norms};
use crate::cpu::vmath::{EXP2_P, LOG_P, ROUND_MAGIC};

const W: usize = 8;
/// Vectors per step of the main loops.
const STEP: usize = 2;
/// Bits of `f32` √½: `bits − SQRT_HALF_BITS` has the exponent of `x` folded so that the mantissa is in [√½, √2).
const SQRT_HALF_BITS: i32 = 0x3f35_04f3;
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

/// `log2 x` of `N` vectors, `x` positive and normal (or +∞), as `vmath::log2_one`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn log2_v<const N: usize>(x: [__m256; N]) -> [__m256; N] {
    let c = splat(LOG_P);
    let one = _mm256_set1_ps(1.0);
    let (mut t, mut e) = ([one; N], [one; N]);
    for j in 0..N {
        let bits = _mm256_castps_si256(x[j]);
        let folded = _mm256_srai_epi32::<23>(_mm256_sub_epi32(bits, _mm256_set1_epi32(SQRT_HALF_BITS)));
        let m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32::<23>(folded)));
        t[j] = _mm256_sub_ps(m, one);
        e[j] = _mm256_cvtepi32_ps(folded);
    }
    let mut out = [one; N];
    for j in 0..N {
        let t = t[j];
        let t2 = _mm256_mul_ps(t, t);
        let t4 = _mm256_mul_ps(t2, t2);
        let p01 = _mm256_fmadd_ps(c[7], t, c[8]);
        let p23 = _mm256_fmadd_ps(c[5], t, c[6]);
        let p45 = _mm256_fmadd_ps(c[3], t, c[4]);
        let p67 = _mm256_fmadd_ps(c[1], t, c[2]);
        let low = _mm256_fmadd_ps(p23, t2, p01);
        let high = _mm256_fmadd_ps(_mm256_fmadd_ps(c[0], t2, p67), t2, p45);
        let p = _mm256_fmadd_ps(high, t4, low);
        let ln = _mm256_fmadd_ps(_mm256_mul_ps(t2, t), p, _mm256_fmadd_ps(_mm256_set1_ps(-0.5), t2, t));
        out[j] = _mm256_fmadd_ps(ln, _mm256_set1_ps(std::f32::consts::LOG2_E), e[j]);
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
fn tail_mask(len: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// `tail` (fewer than 8 values) followed by zeros.
fn padded(tail: &[f32]) -> __m256 {
    let mut lanes = [0.0; W];
    lanes[..tail.len()].copy_from_slice(tail);
    // SAFETY: `[f32; 8]` and `__m256` have the same size, and every bit pattern is valid for both.
    unsafe { std::mem::transmute::<[f32; W], __m256>(lanes) }
}

fn to_lanes(v: __m256) -> [f32; W] {
    // SAFETY: `__m256` and `[f32; 8]` have the same size, and every bit pattern is a valid f32.
    unsafe { std::mem::transmute(v) }
}

/// `N` vectors from `ptr`.
///
/// # Safety
/// `ptr` must be valid for reads of `N·8` f32 values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_v<const N: usize>(ptr: *const f32) -> [__m256; N] {
    let mut v = [_mm256_setzero_ps(); N];
    for (j, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(ptr.add(j * W));
    }
    v
}

/// Writes `N` vectors to `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `N·8` f32 values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_v<const N: usize>(ptr: *mut f32, v: [__m256; N]) {
    for (j, v) in v.iter().enumerate() {
        _mm256_storeu_ps(ptr.add(j * W), *v);
    }
}

/// `r = max(relu(z) + ε, f32::MIN_POSITIVE)` of `N` vectors (`max(z, 0)` is 0 for a NaN z, like `f32::max`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn shifted_relu_v<const N: usize>(mut z: [__m256; N], eps: f32) -> [__m256; N] {
    let (zero, eps, tiny) = (_mm256_setzero_ps(), _mm256_set1_ps(eps), _mm256_set1_ps(f32::MIN_POSITIVE));
    for z in &mut z {
        *z = _mm256_max_ps(_mm256_add_ps(_mm256_max_ps(*z, zero), eps), tiny);
    }
    z
}

/// `2^(γ·ls + offset)` of `N` vectors.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn power_v<const N: usize>(mut ls: [__m256; N], gamma: __m256, offset: __m256) -> [__m256; N] {
    for x in &mut ls {
        *x = _mm256_fmadd_ps(gamma, *x, offset);
    }
    exp2_v(ls)
}

/// Sum of the slots, then of the lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn total(acc: [__m256; STEP]) -> f32 {
    lanes_sum(to_lanes(acc[1..].iter().fold(acc[0], |a, b| _mm256_add_ps(a, *b))))
}

/// Per-row accumulators of pass 1: `Σ r²` and `max log2 r` per slot and lane.
struct LogAcc {
    r2: [__m256; STEP],
    lmax: [__m256; STEP],
}

impl LogAcc {
    /// Adds `N <= STEP` vectors of `r` and their `ls` into slots `0..N`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn add<const N: usize>(&mut self, r: [__m256; N], ls: [__m256; N]) {
        for j in 0..N {
            self.r2[j] = _mm256_fmadd_ps(r[j], r[j], self.r2[j]);
            self.lmax[j] = _mm256_max_ps(ls[j], self.lmax[j]);
        }
    }

    /// `(‖r‖, max ls)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn finish(&self) -> (f32, f32) {
        let lmax = self.lmax[1..].iter().fold(self.lmax[0], |a, b| _mm256_max_ps(a, *b));
        (total(self.r2).sqrt(), lanes_max(to_lanes(lmax)))
    }
}

/// Pass 1 of one row: `ls = log2 r`; returns `(‖r‖, max ls)` (see `super::log_row`).
#[target_feature(enable = "avx2,fma")]
fn log_row(z: &[f32], eps: f32, ls: &mut [f32]) -> (f32, f32) {
    let mut acc = LogAcc { r2: [_mm256_setzero_ps(); STEP], lmax: [_mm256_set1_ps(f32::NEG_INFINITY); STEP] };
    let mut zs = z.chunks_exact(STEP * W);
    let mut lss = ls.chunks_exact_mut(STEP * W);
    for (zc, lc) in (&mut zs).zip(&mut lss) {
        // SAFETY: both chunks hold STEP·8 values.
        let r = shifted_relu_v(unsafe { load_v::<STEP>(zc.as_ptr()) }, eps);
        let l = log2_v(r);
        unsafe { store_v(lc.as_mut_ptr(), l) };
        acc.add(r, l);
    }
    let (z, ls) = (zs.remainder(), lss.into_remainder());
    let mut zs = z.chunks_exact(W);
    let mut lss = ls.chunks_exact_mut(W);
    for (zc, lc) in (&mut zs).zip(&mut lss) {
        // SAFETY: both chunks hold 8 values.
        let r = shifted_relu_v(unsafe { load_v::<1>(zc.as_ptr()) }, eps);
        let l = log2_v(r);
        unsafe { store_v(lc.as_mut_ptr(), l) };
        acc.add(r, l);
    }
    let (z, ls) = (zs.remainder(), lss.into_remainder());
    if !z.is_empty() {
        // Zero-padded: the padded lanes are masked out of the norm and the maximum.
        let keep = _mm256_castsi256_ps(tail_mask(z.len()));
        let r = shifted_relu_v([padded(z)], eps)[0];
        let l = log2_v([r])[0];
        ls.copy_from_slice(&to_lanes(l)[..ls.len()]);
        acc.add([_mm256_and_ps(r, keep)], [_mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), l, keep)]);
    }
    acc.finish()
}

/// Pass 2 of one row: `p = 2^(γ·(ls − shift))`; returns `‖p‖` (see `super::exp_row`).
#[target_feature(enable = "avx2,fma")]
fn exp_row(gamma: f32, shift: f32, ls: &[f32], p: &mut [f32]) -> f32 {
    let (g, offset) = (_mm256_set1_ps(gamma), _mm256_set1_ps(-gamma * shift));
    let mut p2 = [_mm256_setzero_ps(); STEP];
    let mut lss = ls.chunks_exact(STEP * W);
    let mut ps = p.chunks_exact_mut(STEP * W);
    for (lc, pc) in (&mut lss).zip(&mut ps) {
        // SAFETY: both chunks hold STEP·8 values.
        let v = power_v(unsafe { load_v::<STEP>(lc.as_ptr()) }, g, offset);
        unsafe { store_v(pc.as_mut_ptr(), v) };
        for (acc, v) in p2.iter_mut().zip(v) {
            *acc = _mm256_fmadd_ps(v, v, *acc);
        }
    }
    let (ls, p) = (lss.remainder(), ps.into_remainder());
    let mut lss = ls.chunks_exact(W);
    let mut ps = p.chunks_exact_mut(W);
    for (lc, pc) in (&mut lss).zip(&mut ps) {
        // SAFETY: both chunks hold 8 values.
        let v = power_v(unsafe { load_v::<1>(lc.as_ptr()) }, g, offset);
        unsafe { store_v(pc.as_mut_ptr(), v) };
        p2[0] = _mm256_fmadd_ps(v[0], v[0], p2[0]);
    }
    let (ls, p) = (lss.remainder(), ps.into_remainder());
    if !ls.is_empty() {
        // Zero-padded: the padded lanes are masked out of the norm.
        let v = power_v([padded(ls)], g, offset)[0];
        p.copy_from_slice(&to_lanes(v)[..p.len()]);
        let v = _mm256_and_ps(v, _mm256_castsi256_ps(tail_mask(ls.len())));
        p2[0] = _mm256_fmadd_ps(v, v, p2[0]);
    }
    total(p2).sqrt()
}

/// [`super::power_rows`] with intrinsics: the same contract (checked by the caller).
#[target_feature(enable = "avx2,fma")]
pub fn power_rows(z: &[f32], gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    let d = z.len() / gamma.len().max(1);
    for ((zr, lr), n) in z.chunks_exact(d).zip(ls.chunks_exact_mut(d)).zip(norms.iter_mut()) {
        *n = log_row(zr, eps, lr);
    }
    for (((lr, pr), n), &g) in ls.chunks_exact(d).zip(p.chunks_exact_mut(d)).zip(norms.iter_mut()).zip(gamma) {
        n.1 = exp_row(g, n.1, lr, pr);
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

/// `∂L/∂z` and `∂L/∂γ` of one row, as `super::grad_row` (same operations in the same order, per lane).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
fn grad_row(z: &[f32], g: &[f32], gamma: f32, eps: f32, ls: &[f32], p: &[f32], norms: Norms, dz: &mut [f32]) -> f32 {
    let (n1, n2) = norms;
    let inv_n2 = 1.0 / n2;
    let gu = crate::cpu::vmath::dot(g, p) * inv_n2;
    let (a, b) = (_mm256_set1_ps(gu / n1), _mm256_set1_ps(gamma * n1));
    let (inv_n2, gu, eps, zero) = (_mm256_set1_ps(inv_n2), _mm256_set1_ps(gu), _mm256_set1_ps(eps), _mm256_setzero_ps());
    let mut dgamma = zero;
    let mut step = |zv: __m256, gv: __m256, lv: __m256, pv: __m256| -> __m256 {
        let r = _mm256_add_ps(_mm256_max_ps(zv, zero), eps);
        let u = _mm256_mul_ps(pv, inv_n2);
        let proj = _mm256_fnmadd_ps(u, gu, gv);
        let dr = _mm256_fmadd_ps(a, r, _mm256_mul_ps(_mm256_mul_ps(b, _mm256_div_ps(u, r)), proj));
        dgamma = _mm256_fmadd_ps(_mm256_mul_ps(proj, u), lv, dgamma);
        _mm256_and_ps(dr, _mm256_cmp_ps::<_CMP_GT_OQ>(zv, zero))
    };
    let split = z.len() - z.len() % W;
    for at in (0..split).step_by(W) {
        // SAFETY: every row has `z.len() >= at + 8` values (same lengths, checked by the caller).
        let [zv, gv, lv, pv] = [z, g, ls, p].map(|row| unsafe { _mm256_loadu_ps(row.as_ptr().add(at)) });
        unsafe { _mm256_storeu_ps(dz.as_mut_ptr().add(at), step(zv, gv, lv, pv)) };
    }
    if split < z.len() {
        // Zero-padded tails: padded lanes have r = ε > 0 and u = 0, so they add 0 to dγ.
        let [zv, gv, lv, pv] = [z, g, ls, p].map(|row| padded(&row[split..]));
        let mut out = [0.0; W];
        // SAFETY: `out` holds 8 values.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), step(zv, gv, lv, pv)) };
        dz[split..].copy_from_slice(&out[..z.len() - split]);
    }
    n1 * lanes_sum(to_lanes(dgamma)) * std::f32::consts::LN_2
}
