//! The AVX-512 clones of [`super::power_rows`] and [`super::power_rows_grad`], written with `__m512` intrinsics:
//! the operations of the AVX2 clone (`super::avx2`, itself `vmath`'s `log2` / `exp2` op for op) on 16 lanes, the
//! forward on `GROUP` rows side by side so their long chains interleave (with one accumulator per row for its
//! norms, so those round differently from the AVX2 clone's). Tails are masked loads and stores; padded lanes are
//! kept out of every sum by the mask.

use std::arch::x86_64::*;

use super::{Input, Norms, Output};
use crate::cpu::vmath::{log2_one, EXP2_P, LANES, LOG2_P, ROUND_MAGIC, SQRT_HALF_BITS};

const W: usize = 16;
/// `ROUND_MAGIC + 127`: `x + EXP2_MAGIC` holds `round(x) + 127` in its low mantissa bits, so shifting its bits
/// left by 23 gives the bits of `2^round(x)` directly (0 for −127).
const EXP2_MAGIC: f32 = ROUND_MAGIC + 127.0;

/// Every value of `c` broadcast to a vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn splat<const K: usize>(c: [f32; K]) -> [__m512; K] {
    c.map(|c| _mm512_set1_ps(c))
}

/// `log2 x` of `N` vectors, `x` positive, normal and finite, as `vmath::log2_one`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn log2_v<const N: usize>(x: [__m512; N]) -> [__m512; N] {
    let c = splat(LOG2_P);
    let one = _mm512_set1_ps(1.0);
    let mut out = [one; N];
    for j in 0..N {
        let bits = _mm512_castps_si512(x[j]);
        let folded = _mm512_srai_epi32::<23>(_mm512_sub_epi32(bits, _mm512_set1_epi32(SQRT_HALF_BITS)));
        let m = _mm512_castsi512_ps(_mm512_sub_epi32(bits, _mm512_slli_epi32::<23>(folded)));
        let s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
        let s2 = _mm512_mul_ps(s, s);
        let mut p = c[0];
        for coef in &c[1..] {
            p = _mm512_fmadd_ps(p, s2, *coef);
        }
        out[j] = _mm512_fmadd_ps(s, p, _mm512_cvtepi32_ps(folded));
    }
    out
}

/// `2^x` of `N` vectors, clamped to [−127, 127] (−127 and below give 0), as `vmath::exp2_one`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn exp2_v<const N: usize>(x: [__m512; N]) -> [__m512; N] {
    let c = splat(EXP2_P);
    let magic = _mm512_set1_ps(EXP2_MAGIC);
    let (mut f, mut scale) = ([magic; N], [magic; N]);
    for j in 0..N {
        // `max_ps`/`min_ps` return their second operand when either is NaN: `x` second, so a NaN stays NaN.
        let x = _mm512_min_ps(_mm512_set1_ps(127.0), _mm512_max_ps(_mm512_set1_ps(-127.0), x[j]));
        let t = _mm512_add_ps(x, magic);
        f[j] = _mm512_sub_ps(x, _mm512_sub_ps(t, magic));
        scale[j] = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(t)));
    }
    let mut p = [c[0]; N];
    for coef in &c[1..] {
        for j in 0..N {
            p[j] = _mm512_fmadd_ps(p[j], f[j], *coef);
        }
    }
    for j in 0..N {
        p[j] = _mm512_mul_ps(_mm512_fmadd_ps(f[j], p[j], _mm512_set1_ps(1.0)), scale[j]);
    }
    p
}

/// Lanes `< len` (`len <= 16`).
fn tail_mask(len: usize) -> __mmask16 {
    debug_assert!(len <= W);
    ((1u32 << len) - 1) as __mmask16
}

/// The values of `src` (at most 16) in the first lanes, `fill` in the others.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn load_tail(src: &[f32], fill: f32) -> __m512 {
    let src = &src[..src.len().min(W)];
    // SAFETY: the mask selects the first `src.len()` lanes, all inside `src`; masked-off lanes are not read (a
    // masked load suppresses their faults).
    unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), tail_mask(src.len()), src.as_ptr()) }
}

/// Writes the first `dst.len()` lanes of `v` (at most 16) to `dst`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn store_tail(dst: &mut [f32], v: __m512) {
    let len = dst.len().min(W);
    let dst = &mut dst[..len];
    // SAFETY: the mask selects the first `dst.len()` lanes, all inside `dst`; masked-off lanes are not written.
    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), tail_mask(dst.len()), v) }
}

/// The first `N·16` values of `src` as `N` vectors (panics if it holds fewer).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn load_v<const N: usize>(src: &[f32]) -> [__m512; N] {
    let src = &src[..N * W];
    let mut v = [_mm512_setzero_ps(); N];
    for (j, v) in v.iter_mut().enumerate() {
        // SAFETY: `src` holds `N·16` values, so the 16 from `j·16` (`j < N`) are inside it.
        *v = unsafe { _mm512_loadu_ps(src.as_ptr().add(j * W)) };
    }
    v
}

/// Writes `N` vectors to the first `N·16` values of `dst` (panics if it holds fewer).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn store_v<const N: usize>(dst: &mut [f32], v: [__m512; N]) {
    let dst = &mut dst[..N * W];
    for (j, v) in v.iter().enumerate() {
        // SAFETY: `dst` holds `N·16` values, so the 16 from `j·16` (`j < N`) are inside it.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(j * W), *v) };
    }
}

/// The input elements the clone reads: f32 as they are, bf16 bits widened to f32 in registers (its bits are the
/// high half of an f32's: exact; a signalling NaN stays one until the first arithmetic, which makes it quiet as
/// the bf16 conversion of `vmath` does). The loops are generic over it, so no load matches on the input's type.
trait Elem: Copy {
    /// The first 16 values of `src` as f32 (panics if it holds fewer).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    unsafe fn load16(src: &[Self]) -> __m512;

    /// The values of `src` (at most 16) in the first lanes as f32, 0 in the others.
    ///
    /// # Safety
    /// As for [`Elem::load16`].
    unsafe fn load_part(src: &[Self]) -> __m512;
}

impl Elem for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn load16(src: &[f32]) -> __m512 {
        load_v::<1>(src)[0]
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn load_part(src: &[f32]) -> __m512 {
        load_tail(src, 0.0)
    }
}

impl Elem for u16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn load16(src: &[u16]) -> __m512 {
        let src = &src[..W];
        // SAFETY: `src` holds 16 u16, the 32 bytes read.
        let bits = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn load_part(src: &[u16]) -> __m512 {
        let src = &src[..src.len().min(W)];
        // SAFETY: the mask selects the first `src.len()` lanes, all inside `src`; masked-off lanes are not read (a
        // masked load suppresses their faults).
        let bits = unsafe { _mm256_maskz_loadu_epi16(tail_mask(src.len()), src.as_ptr().cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }
}

/// The gradient elements the clone writes: f32 as they are, or bf16 bits rounded to nearest even with a NaN made
/// quiet, bit for bit as `vmath::f32_to_bf16` (the same integer steps per lane).
trait OutElem: Copy {
    /// Writes the 16 lanes of `v` to the first 16 elements of `dst` (panics if it holds fewer).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    unsafe fn store16(dst: &mut [Self], v: __m512);

    /// Writes the first `dst.len()` lanes of `v` (at most 16) to `dst`.
    ///
    /// # Safety
    /// As for [`OutElem::store16`].
    unsafe fn store_part(dst: &mut [Self], v: __m512);
}

impl OutElem for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn store16(dst: &mut [f32], v: __m512) {
        store_v(dst, [v]);
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn store_part(dst: &mut [f32], v: __m512) {
        store_tail(dst, v);
    }
}

/// The bf16 bits of the 16 lanes of `v`, as `vmath::f32_to_bf16`: `(bits + 0x7fff + kept lowest bit) >> 16`, or
/// for a NaN `(bits >> 16) | 0x40`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn bf16_bits(v: __m512) -> __m256i {
    let bits = _mm512_castps_si512(v);
    let high = _mm512_srli_epi32::<16>(bits);
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
    let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
    _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet))
}

impl OutElem for u16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn store16(dst: &mut [u16], v: __m512) {
        let dst = &mut dst[..W];
        // SAFETY: `dst` holds 16 u16, the 32 bytes written.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), bf16_bits(v)) };
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn store_part(dst: &mut [u16], v: __m512) {
        let len = dst.len().min(W);
        let dst = &mut dst[..len];
        // SAFETY: the mask selects the first `dst.len()` lanes, all inside `dst`; masked-off lanes are not written.
        unsafe { _mm256_mask_storeu_epi16(dst.as_mut_ptr().cast(), tail_mask(dst.len()), bf16_bits(v)) };
    }
}

/// Rows a step of [`power_rows`] maps together: one row's work is a chain (its sums across lanes, the shift, the
/// `log2` → `exp2` polynomials, the norm and its square root) too short to fill the vector units, so the rows of
/// a group run each pass side by side and their chains overlap (on the Zen 4 test machine, 64-wide rows in L2:
/// 1.45x faster than row after row; groups of 2 and 8 were slower than 4).
const GROUP: usize = 4;
/// How many groups ahead pass 1 prefetches its input: the rows stream in from memory, and the CPU's own
/// prefetcher stops at page bounds (waiting for them was most of the forward's time in situ).
const PREFETCH_GROUPS: usize = 4;

/// [`super::power_rows`] with AVX-512 intrinsics: the same contract (checked by the caller).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub fn power_rows(z: Input, gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    match z {
        Input::F32(z) => power_rows_of(z, gamma, eps, ls, p, norms),
        Input::Bf16(z) => power_rows_of(z, gamma, eps, ls, p, norms),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn power_rows_of<T: Elem>(z: &[T], gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    let d = z.len() / gamma.len().max(1);
    let whole = gamma.len() - gamma.len() % GROUP;
    let (z, ls, p) = (z.split_at(whole * d), ls.split_at_mut(whole * d), p.split_at_mut(whole * d));
    let groups = z.0.chunks_exact(GROUP * d).zip(ls.0.chunks_exact_mut(GROUP * d)).zip(p.0.chunks_exact_mut(GROUP * d));
    let per_group = gamma[..whole].chunks_exact(GROUP).zip(norms[..whole].chunks_exact_mut(GROUP));
    for (((zg, lg), pg), (gg, ng)) in groups.zip(per_group) {
        rows_group::<GROUP, T>(d, zg, gg, eps, lg, pg, ng);
    }
    let rows = z.1.chunks_exact(d).zip(ls.1.chunks_exact_mut(d)).zip(p.1.chunks_exact_mut(d));
    for (((zr, lr), pr), (g, n)) in rows.zip(gamma[whole..].chunks_exact(1).zip(norms[whole..].chunks_exact_mut(1))) {
        rows_group::<1, T>(d, zr, g, eps, lr, pr, n);
    }
}

/// `G` rows of `d` values (`z`, `ls`, `p`: `G·d`; `gamma`, `norms`: `G`), as `super::relu_row` then
/// `super::power_row` per row: pass 1 takes `r = max(relu(z) + ε, f32::MIN_POSITIVE)` with `‖r‖` and `max r` and
/// writes `ls = log2 r` (which needs neither sum); pass 2 `p = 2^(γ·(ls − log2 max r))` with `‖p‖`. Tails are
/// masked.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn rows_group<const G: usize, T: Elem>(d: usize, z: &[T], gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    let (z, ls, p) = (&z[..G * d], &mut ls[..G * d], &mut p[..G * d]);
    let (full, tail) = (d / W * W, d % W);
    let keep = tail_mask(tail);
    let (zero, epsv, tiny) = (_mm512_setzero_ps(), _mm512_set1_ps(eps), _mm512_set1_ps(f32::MIN_POSITIVE));
    // `max_ps` returns its second operand when either is NaN: `z` second, so a NaN z stays NaN (as in torch).
    let relu = |z: __m512| _mm512_max_ps(tiny, _mm512_add_ps(_mm512_max_ps(zero, z), epsv));
    let (mut r2, mut rmax) = ([zero; G], [zero; G]);
    for c in (0..full).step_by(W) {
        let mut r = [zero; G];
        for j in 0..G {
            // The address may lie past `z`: a prefetch never faults.
            _mm_prefetch::<_MM_HINT_T0>(z.as_ptr().wrapping_add(j * d + c + PREFETCH_GROUPS * G * d).cast());
            // SAFETY: this function's target features include AVX-512 F/BW/VL.
            r[j] = relu(unsafe { T::load16(&z[j * d + c..]) });
            r2[j] = _mm512_fmadd_ps(r[j], r[j], r2[j]);
            rmax[j] = _mm512_max_ps(r[j], rmax[j]);
        }
        for (j, l) in log2_v(r).into_iter().enumerate() {
            store_v(&mut ls[j * d + c..], [l]);
        }
    }
    if tail > 0 {
        // Padded lanes have r = max(ε, tiny) (a finite log); they are kept out of every sum and not stored.
        let mut r = [zero; G];
        for j in 0..G {
            // SAFETY: as above.
            r[j] = relu(unsafe { T::load_part(&z[j * d + full..(j + 1) * d]) });
            r2[j] = _mm512_mask3_fmadd_ps(r[j], r[j], r2[j], keep);
            rmax[j] = _mm512_mask_max_ps(rmax[j], keep, r[j], rmax[j]);
        }
        for (j, l) in log2_v(r).into_iter().enumerate() {
            store_tail(&mut ls[j * d + full..(j + 1) * d], l);
        }
    }
    let mut n1 = [0.0f32; G];
    let (mut g, mut offset) = ([zero; G], [zero; G]);
    for j in 0..G {
        n1[j] = _mm512_reduce_add_ps(r2[j]).sqrt();
        g[j] = _mm512_set1_ps(gamma[j]);
        offset[j] = _mm512_set1_ps(-gamma[j] * log2_one::<true>(_mm512_reduce_max_ps(rmax[j])));
    }
    let mut p2 = [zero; G];
    for c in (0..full).step_by(W) {
        let mut x = [zero; G];
        for j in 0..G {
            x[j] = _mm512_fmadd_ps(g[j], load_v::<1>(&ls[j * d + c..])[0], offset[j]);
        }
        for (j, v) in exp2_v(x).into_iter().enumerate() {
            store_v(&mut p[j * d + c..], [v]);
            p2[j] = _mm512_fmadd_ps(v, v, p2[j]);
        }
    }
    if tail > 0 {
        let mut x = [zero; G];
        for j in 0..G {
            // Padded with 0 (a finite power); the padded lanes are kept out of the norm.
            x[j] = _mm512_fmadd_ps(g[j], load_tail(&ls[j * d + full..(j + 1) * d], 0.0), offset[j]);
        }
        for (j, v) in exp2_v(x).into_iter().enumerate() {
            store_tail(&mut p[j * d + full..(j + 1) * d], v);
            p2[j] = _mm512_mask3_fmadd_ps(v, v, p2[j], keep);
        }
    }
    for j in 0..G {
        norms[j] = (n1[j], _mm512_reduce_add_ps(p2[j]).sqrt());
    }
}

/// [`super::power_rows_grad`] with AVX-512 intrinsics: the same contract (checked by the caller).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub fn power_rows_grad(
    z: Input,
    g: &[f32],
    gamma: &[f32],
    eps: f32,
    ls: &[f32],
    p: &[f32],
    norms: &[Norms],
    dz: Output,
    dgamma: &mut [f32],
) {
    match (z, dz) {
        (Input::F32(z), Output::F32(dz)) => power_rows_grad_of(z, g, gamma, eps, ls, p, norms, dz, dgamma),
        (Input::F32(z), Output::Bf16(dz)) => power_rows_grad_of(z, g, gamma, eps, ls, p, norms, dz, dgamma),
        (Input::Bf16(z), Output::F32(dz)) => power_rows_grad_of(z, g, gamma, eps, ls, p, norms, dz, dgamma),
        (Input::Bf16(z), Output::Bf16(dz)) => power_rows_grad_of(z, g, gamma, eps, ls, p, norms, dz, dgamma),
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn power_rows_grad_of<T: Elem, O: OutElem>(
    z: &[T],
    g: &[f32],
    gamma: &[f32],
    eps: f32,
    ls: &[f32],
    p: &[f32],
    norms: &[Norms],
    dz: &mut [O],
    dgamma: &mut [f32],
) {
    let d = z.len() / gamma.len().max(1);
    let rows = z.chunks_exact(d).zip(g.chunks_exact(d)).zip(ls.chunks_exact(d).zip(p.chunks_exact(d)));
    let per_row = gamma.iter().zip(norms).zip(dz.chunks_exact_mut(d).zip(dgamma.iter_mut()));
    for (((zr, gr), (lr, pr)), ((&ga, &n), (dzr, dg))) in rows.zip(per_row) {
        *dg = grad_row(zr, gr, ga, eps, lr, pr, n, dzr);
    }
}

/// The four split sums of 8 values (`[small p², small g·p, large p², large g·p]`, the others +0) added to `acc`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn add_halves(acc: &mut [__m256; 4], parts: [__m512; 4], half: impl Fn(__m512) -> __m256) {
    for (a, part) in acc.iter_mut().zip(parts) {
        *a = _mm256_add_ps(*a, half(part));
    }
}

/// `super::split_sums` with vectors, bit-equal to it: the products and the split in 16 lanes, added to the
/// portable body's 8 lane sums half by half (the first 8 values, then the next 8: the order of its chunks), tail
/// entries into lane 0, lanes summed first to last. Adding a masked-off +0 leaves a sum that is never −0 unchanged.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) fn split_sums(g: &[f32], p: &[f32]) -> [f32; 4] {
    let threshold = _mm512_set1_ps(super::LARGE);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut gs = g.chunks_exact(W);
    let mut ps = p.chunks_exact(W);
    for (gc, pc) in (&mut gs).zip(&mut ps) {
        let [gv, pv] = [gc, pc].map(|c| load_v::<1>(c)[0]);
        let (own2, own_g) = (_mm512_mul_ps(pv, pv), _mm512_mul_ps(gv, pv));
        let large = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(pv, threshold);
        let parts = [(!large, own2), (!large, own_g), (large, own2), (large, own_g)].map(|(k, v)| _mm512_maskz_mov_ps(k, v));
        add_halves(&mut acc, parts, |v| _mm512_castps512_ps256(v));
        add_halves(&mut acc, parts, |v| _mm512_extractf32x8_ps::<1>(v));
    }
    let (g, p) = (gs.remainder(), ps.remainder());
    let split = p.len() - p.len() % LANES;
    if split > 0 {
        // One chunk of 8 left (fewer than 16 remain): the same sums on the low half.
        let [gv, pv] = [g, p].map(|c| load_tail(&c[..LANES], 0.0));
        let (own2, own_g) = (_mm512_mul_ps(pv, pv), _mm512_mul_ps(gv, pv));
        let large = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(pv, threshold);
        let parts = [(!large, own2), (!large, own_g), (large, own2), (large, own_g)].map(|(k, v)| _mm512_maskz_mov_ps(k, v));
        add_halves(&mut acc, parts, |v| _mm512_castps512_ps256(v));
    }
    // SAFETY: `__m256` and `[f32; 8]` have the same size, and every bit pattern is a valid f32.
    let mut lanes = acc.map(|v| unsafe { std::mem::transmute::<__m256, [f32; LANES]>(v) });
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
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn projection(gv: __m512, pv: __m512, sums: &[__m512; 4]) -> __m512 {
    let [small2, small_g, large2, large_g] = *sums;
    let (own2, own_g) = (_mm512_mul_ps(pv, pv), _mm512_mul_ps(gv, pv));
    let large = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(pv, _mm512_set1_ps(super::LARGE));
    let (l2, lg) = (_mm512_maskz_mov_ps(large, own2), _mm512_maskz_mov_ps(large, own_g));
    let others2 = _mm512_add_ps(_mm512_sub_ps(small2, _mm512_sub_ps(own2, l2)), _mm512_sub_ps(large2, l2));
    let others_g = _mm512_add_ps(_mm512_sub_ps(small_g, _mm512_sub_ps(own_g, lg)), _mm512_sub_ps(large_g, lg));
    _mm512_sub_ps(_mm512_mul_ps(gv, others2), _mm512_mul_ps(pv, others_g))
}

/// `∂L/∂z` and `∂L/∂γ` of one row, as `super::grad_row` (same operations in the same order, per lane).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn grad_row<T: Elem, O: OutElem>(z: &[T], g: &[f32], gamma: f32, eps: f32, ls: &[f32], p: &[f32], norms: Norms, dz: &mut [O]) -> f32 {
    let (n1, n2) = norms;
    let inv_n2 = 1.0 / n2;
    let sums = split_sums(g, p);
    let gu = (sums[1] + sums[3]) * inv_n2;
    let (a, b) = (_mm512_set1_ps(gu / n1), _mm512_set1_ps(gamma * n1));
    let (inv_n2_sq, sums) = (_mm512_set1_ps(inv_n2 * inv_n2), splat(sums));
    let (inv_n2, eps, zero) = (_mm512_set1_ps(inv_n2), _mm512_set1_ps(eps), _mm512_setzero_ps());
    let mut dgamma = zero;
    // `dz` of 16 entries; the lanes of `keep` add to `dgamma`.
    let mut step = |zv: __m512, gv: __m512, lv: __m512, pv: __m512, keep: __mmask16| -> __m512 {
        let r = _mm512_add_ps(_mm512_max_ps(zv, zero), eps);
        let u = _mm512_mul_ps(pv, inv_n2);
        let proj = _mm512_mul_ps(projection(gv, pv, &sums), inv_n2_sq);
        let dr = _mm512_fmadd_ps(a, r, _mm512_mul_ps(_mm512_mul_ps(b, _mm512_div_ps(u, r)), proj));
        dgamma = _mm512_mask3_fmadd_ps(_mm512_mul_ps(proj, u), lv, dgamma, keep);
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(zv, zero), dr)
    };
    let split = z.len() - z.len() % W;
    let vectors = z.chunks_exact(W).zip(g.chunks_exact(W)).zip(ls.chunks_exact(W).zip(p.chunks_exact(W)));
    for (((zc, gc), (lc, pc)), dc) in vectors.zip(dz.chunks_exact_mut(W)) {
        let [gv, lv, pv] = [gc, lc, pc].map(|c| load_v::<1>(c)[0]);
        // SAFETY: this function's target features include AVX-512 F/BW/VL.
        unsafe { O::store16(dc, step(T::load16(zc), gv, lv, pv, !0)) };
    }
    if split < z.len() {
        // Zero-padded tail, its padded lanes kept out of `dgamma` (and not stored).
        // SAFETY: as above.
        let zv = unsafe { T::load_part(&z[split..]) };
        let [gv, lv, pv] = [g, ls, p].map(|row| load_tail(&row[split..], 0.0));
        let dr = step(zv, gv, lv, pv, tail_mask(z.len() - split));
        // SAFETY: as above.
        unsafe { O::store_part(&mut dz[split..], dr) };
    }
    n1 * _mm512_reduce_add_ps(dgamma) * std::f32::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::{Isa, Level};

    #[test]
    fn bf16_bits_round_as_the_vmath_conversion() {
        if !Isa::supported().into_iter().any(|i| i.level() >= Level::Avx512) {
            eprintln!("skipped: the CPU lacks AVX-512 F/BW/DQ/VL");
            return;
        }
        // Ties with an even and an odd kept part, just above and below them, the largest finite values (one rounds
        // to infinity), infinities, signalling and quiet NaNs of both signs, zeros, denormals.
        let bits: [u32; 16] = [
            0x3f80_8000, 0x3f81_8000, 0x3f80_8001, 0x3f81_7fff, 0x7f7f_7fff, 0x7f7f_8000, 0x7f80_0000, 0xff80_0000,
            0x7f80_0001, 0xff81_2345, 0x7fc0_0000, 0xffff_ffff, 0x0000_0000, 0x8000_0000, 0x0000_8000, 0x8001_8000,
        ];
        let values = bits.map(f32::from_bits);
        let mut want = [0u16; 16];
        crate::cpu::vmath::f32_to_bf16(&values, &mut want);
        let mut got = [0u16; 16];
        // SAFETY: the CPU has AVX-512 F/BW/DQ/VL (checked above).
        unsafe { <u16 as OutElem>::store16(&mut got, load_v::<1>(&values)[0]) };
        assert_eq!(want, got);
        let mut part = [0u16; 16];
        // SAFETY: as above.
        unsafe { <u16 as OutElem>::store_part(&mut part[..5], load_v::<1>(&values)[0]) };
        assert_eq!(want[..5], part[..5]);
        assert_eq!(part[5..], [0; 11]);
    }
}
