//! Element-wise vector math shared by every CPU kernel: branch-free `exp2` / `log2` that the compiler vectorises
//! (no float→int casts, whose saturating semantics scalarise a loop), and row functions (reductions with one
//! accumulator per lane: a single float accumulator cannot be reordered) generic over the vector width, compiled
//! for each instruction set by `isa_dispatch!` and run on the level in use ([`Isa::current`]). Callers with their
//! own row loops use the `FMA`-generic pieces inside their own clones.

use super::isa::Isa;

/// Lanes of the portable reductions that are not generic over the width (DyDiLA's power maps).
pub const LANES: usize = 8;

// Cephes' exp2f polynomial on [−0.5, 0.5]: 2^f = 1 + f · P(f).
#[allow(clippy::excessive_precision)] // coefficients as published
pub(crate) const EXP2_P: [f32; 6] = [1.535_336_2e-4, 1.339_887_4e-3, 9.618_437_4e-3, 5.550_332_5e-2, 2.402_264_8e-1, 6.931_472e-1];
/// 1.5·2²³: adding it rounds |x| < 2²² to an integer held in the low mantissa bits.
pub(crate) const ROUND_MAGIC: f32 = 12_582_912.0;
/// Bits of `f32` √½: `bits − SQRT_HALF_BITS` has the exponent of `x` folded so that the mantissa is in [√½, √2).
pub(crate) const SQRT_HALF_BITS: i32 = 0x3f35_04f3;

/// `log2 m = s · P(s²)` with `s = (m − 1) / (m + 1)`, for `m ∈ [√½, √2)` (`|s| <= 0.1716`), highest coefficient
/// first: the series of `2·atanh(s)·log2 e` (`2·log2 e / (2k + 1)`) cut after four terms and refitted for the least
/// maximum error on the interval (5e-9 before rounding).
pub(crate) const LOG2_P: [f32; 4] = [0.434_248_8, 0.576_584_9, 0.961_800_75, 2.885_39];

/// `a·b + c`, fused in the FMA clone (without hardware FMA, `mul_add` is a slow library call).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `2^x`, clamped to [−127, 127]: x <= −127 (−∞ included) gives exactly 0, never a denormal or NaN.
#[inline(always)]
pub fn exp2_one<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-127.0, 127.0);
    let t = x + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let f = x - n;
    let mut p = EXP2_P[0];
    for c in &EXP2_P[1..] {
        p = madd::<FMA>(p, f, *c);
    }
    let exponent = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32) + 127;
    madd::<FMA>(f, p, 1.0) * f32::from_bits((exponent as u32) << 23)
}

/// `log2(x)` for finite `x >= f32::MIN_POSITIVE` (callers clamp), branch-free: the exponent plus `log2` of the
/// mantissa folded into `[√½, √2)`, from the short odd series in `s = (m − 1) / (m + 1)` (one division instead of
/// a degree-9 polynomial).
#[inline(always)]
pub fn log2_one<const FMA: bool>(x: f32) -> f32 {
    let bits = x.to_bits() as i32;
    // Subtracting √½'s bits moves the exponent boundary to √½; the arithmetic shift gives the folded exponent.
    let folded = bits.wrapping_sub(SQRT_HALF_BITS) >> 23;
    let m = f32::from_bits(bits.wrapping_sub(folded << 23) as u32);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = LOG2_P[0];
    for c in &LOG2_P[1..] {
        p = madd::<FMA>(p, s2, *c);
    }
    madd::<FMA>(s, p, folded as f32)
}

#[inline(always)]
fn exp2_scaled_shift_sum_body<const FMA: bool, const W: usize>(row: &mut [f32], mul: f32, shift: f32) -> f32 {
    let mut acc = [0.0f32; W];
    let mut chunks = row.chunks_exact_mut(W);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = exp2_one::<FMA>(madd::<FMA>(*x, mul, -shift));
            *a += *x;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2_one::<FMA>(madd::<FMA>(*x, mul, -shift));
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn exp2_affine_body<const FMA: bool, const W: usize>(row: &mut [f32], mul: f32, bias: &[f32], shift: f32) {
    if bias.is_empty() {
        for chunk in row.chunks_mut(W) {
            chunk.iter_mut().for_each(|x| *x = exp2_one::<FMA>(madd::<FMA>(*x, mul, -shift)));
        }
        return;
    }
    let bias = &bias[..row.len()];
    for (chunk, bc) in row.chunks_mut(W).zip(bias.chunks(W)) {
        chunk.iter_mut().zip(bc).for_each(|(x, b)| *x = exp2_one::<FMA>(madd::<FMA>(*x, mul, b - shift)));
    }
}

#[inline(always)]
fn max_body<const FMA: bool, const W: usize>(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; W];
    let chunks = xs.chunks_exact(W);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

#[inline(always)]
fn dot_body<const FMA: bool, const W: usize>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let split = n - n % W;
    let mut acc = [0.0f32; W];
    for (ac, bc) in a[..split].chunks_exact(W).zip(b[..split].chunks_exact(W)) {
        for l in 0..W {
            acc[l] = madd::<FMA>(ac[l], bc[l], acc[l]);
        }
    }
    for i in split..n {
        acc[0] = madd::<FMA>(a[i], b[i], acc[0]);
    }
    acc.iter().sum()
}

#[inline(always)]
fn add_scaled_body<const FMA: bool, const W: usize>(dst: &mut [f32], src: &[f32], mul: f32) {
    let src = &src[..dst.len()];
    for (dc, sc) in dst.chunks_mut(W).zip(src.chunks(W)) {
        dc.iter_mut().zip(sc).for_each(|(d, s)| *d = madd::<FMA>(*s, mul, *d));
    }
}

#[inline(always)]
fn scale_body<const FMA: bool, const W: usize>(row: &mut [f32], mul: f32) {
    for chunk in row.chunks_mut(W) {
        chunk.iter_mut().for_each(|x| *x *= mul);
    }
}

#[inline(always)]
fn softmax_grad_body<const FMA: bool, const W: usize>(ds: &mut [f32], p: &[f32], delta: f32) {
    let p = &p[..ds.len()];
    for (dc, pc) in ds.chunks_mut(W).zip(p.chunks(W)) {
        dc.iter_mut().zip(pc).for_each(|(g, p)| *g = p * (*g - delta));
    }
}

/// `dst[i] = src[i]` as f32 (bf16 bits are the high half of f32 bits: exact), a NaN made quiet (as
/// `half::bf16::to_f32`, without its branch).
#[inline(always)]
fn bf16_to_f32_body<const FMA: bool, const W: usize>(src: &[u16], dst: &mut [f32]) {
    let src = &src[..dst.len()];
    for (dc, sc) in dst.chunks_mut(W).zip(src.chunks(W)) {
        dc.iter_mut().zip(sc).for_each(|(d, s)| {
            let bits = u32::from(*s);
            let quiet = if bits & 0x7fff > 0x7f80 { 0x40 } else { 0 };
            *d = f32::from_bits((bits | quiet) << 16);
        });
    }
}

/// `dst[i] = src[i]` rounded to the nearest bf16, ties to even (as `half::bf16::from_f32`, without its branches so
/// the loop vectorises): adding `0x7fff` plus the kept part's lowest bit carries into it exactly when the dropped
/// half is above the tie or at it with an odd kept part; a NaN keeps its sign and high payload and is made quiet.
#[inline(always)]
fn f32_to_bf16_body<const FMA: bool, const W: usize>(src: &[f32], dst: &mut [u16]) {
    let src = &src[..dst.len()];
    for (dc, sc) in dst.chunks_mut(W).zip(src.chunks(W)) {
        dc.iter_mut().zip(sc).for_each(|(d, s)| {
            let bits = s.to_bits();
            // Wrapping: only a NaN (discarded below) can carry out of the top bit.
            let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
            let quiet = (bits >> 16) | 0x40;
            *d = if bits & 0x7fff_ffff > 0x7f80_0000 { quiet } else { rounded } as u16;
        });
    }
}

crate::isa_dispatch!(fn exp2_scaled_shift_sum_in(row: &mut [f32], mul: f32, shift: f32) -> f32 = exp2_scaled_shift_sum_body);
crate::isa_dispatch!(fn exp2_affine_in(row: &mut [f32], mul: f32, bias: &[f32], shift: f32) = exp2_affine_body);
crate::isa_dispatch!(fn max_in(row: &[f32]) -> f32 = max_body);
crate::isa_dispatch!(fn dot_in(a: &[f32], b: &[f32]) -> f32 = dot_body);
crate::isa_dispatch!(fn add_scaled_in(dst: &mut [f32], src: &[f32], mul: f32) = add_scaled_body);
crate::isa_dispatch!(fn scale_in(row: &mut [f32], mul: f32) = scale_body);
crate::isa_dispatch!(fn bf16_to_f32_in(src: &[u16], dst: &mut [f32]) = bf16_to_f32_body);
crate::isa_dispatch!(fn f32_to_bf16_in(src: &[f32], dst: &mut [u16]) = f32_to_bf16_body);
crate::isa_dispatch!(fn softmax_grad_in(ds: &mut [f32], p: &[f32], delta: f32) = softmax_grad_body);

/// `row[i] = 2^(row[i] − shift)` (0 at or below 2^−127, so −∞ gives 0); returns the sum of the new values.
pub fn exp2_shift_sum(row: &mut [f32], shift: f32) -> f32 {
    // `x·1 − shift` is `x − shift` exactly, fused or not.
    exp2_scaled_shift_sum(row, 1.0, shift)
}

/// `row[i] = 2^(row[i]·mul − shift)` (one rounding: a fused multiply-add where the level has it); returns the sum
/// of the new values.
pub fn exp2_scaled_shift_sum(row: &mut [f32], mul: f32, shift: f32) -> f32 {
    exp2_scaled_shift_sum_in(Isa::current(), row, mul, shift)
}

/// `row[i] = 2^(row[i]·mul + bias[i] − shift)`, `bias` empty (no bias) or at least as long as `row`.
pub fn exp2_affine(row: &mut [f32], mul: f32, bias: &[f32], shift: f32) {
    exp2_affine_in(Isa::current(), row, mul, bias, shift)
}

/// The largest value of `row` (−∞ when empty).
pub fn max(row: &[f32]) -> f32 {
    max_in(Isa::current(), row)
}

/// `Σ a_i b_i` over the shorter of the two.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_in(Isa::current(), a, b)
}

/// `dst[i] += mul · src[i]` (`src` at least as long as `dst`).
pub fn add_scaled(dst: &mut [f32], src: &[f32], mul: f32) {
    add_scaled_in(Isa::current(), dst, src, mul)
}

/// `row[i] *= mul`.
pub fn scale(row: &mut [f32], mul: f32) {
    scale_in(Isa::current(), row, mul)
}

/// `dst[i] = src[i]` for the bits of bf16 values (`src` at least as long as `dst`).
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    bf16_to_f32_in(Isa::current(), src, dst)
}

/// `dst[i] = src[i]` rounded to the nearest bf16 (ties to even; bits, `src` at least as long as `dst`).
pub fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    f32_to_bf16_in(Isa::current(), src, dst)
}

/// The softmax gradient of one row: `ds[i] = p[i] · (ds[i] − delta)` (`p` at least as long as `ds`).
pub fn softmax_grad(ds: &mut [f32], p: &[f32], delta: f32) {
    softmax_grad_in(Isa::current(), ds, p, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_matches_std_and_maps_minus_infinity_to_zero() {
        let mut xs: Vec<f32> = (-2100..=1900).map(|i| i as f32 * 0.0625).collect();
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64 - 1.0).exp2()).collect();
        let sum = exp2_shift_sum(&mut xs, 1.0) as f64;
        for (got, want) in xs.iter().zip(&want) {
            if *want > 1e-37 && *want < 1e37 {
                assert!(((*got as f64) - want).abs() <= 4e-7 * want, "{got} vs {want}");
            }
        }
        let total: f64 = want.iter().filter(|w| **w < 1e38).sum();
        assert!(sum.is_finite() && (sum - total).abs() <= 1e-5 * total);
        let mut edge = [f32::NEG_INFINITY, 0.0, -500.0, 3.0, 1.0, 2.0, -1.0, 0.5, 0.25];
        exp2_shift_sum(&mut edge, 0.0);
        assert_eq!(&edge[..4], &[0.0, 1.0, 0.0, 8.0]);
        let mut plain = [-3.5f32, 0.0, 2.25, f32::NEG_INFINITY];
        exp2_scaled_shift_sum_body::<false, 8>(&mut plain, 1.0, 0.0);
        assert_eq!(plain[3], 0.0);
        assert!((plain[0] - 0.088_388_35).abs() < 1e-7 && (plain[2] - 4.756_828_5).abs() < 1e-6);
    }

    #[test]
    fn log2_matches_std() {
        let mut x = f32::MIN_POSITIVE;
        while x < 1e30 {
            let want = (x as f64).log2();
            assert!((log2_one::<false>(x) as f64 - want).abs() <= 2e-7 * want.abs().max(1.0), "log2({x})");
            x *= 1.37;
        }
        // Densely across one folded mantissa interval [√½, √2), where only the series contributes: within 1.5e-7
        // absolute with and without FMA (f32 spacing near 1 is 1.2e-7).
        let mut worst = 0.0f64;
        for i in 0..=100_000 {
            let x = (0.5f64.sqrt() * 2f64.powf(i as f64 / 100_000.0)) as f32;
            let want = (x as f64).log2();
            worst = worst.max((log2_one::<false>(x) as f64 - want).abs()).max((log2_one::<true>(x) as f64 - want).abs());
        }
        assert!(worst <= 1.5e-7, "worst log2 error {worst:e}");
    }

    #[test]
    fn max_and_dot_cover_the_tails() {
        let xs: Vec<f32> = (0..19).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
        assert_eq!(max(&xs), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let ys: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let want: f32 = xs.iter().zip(&ys).map(|(a, b)| a * b).sum();
        assert!((dot(&xs, &ys) - want).abs() < 1e-4);
    }

    #[test]
    fn bf16_conversions_match_half_bit_for_bit_on_every_isa() {
        let every: Vec<u16> = (0..=u16::MAX).collect();
        // f32s around every rounding case: each bf16 value with each pattern of the dropped half near and at the
        // tie, plus NaNs with payloads only in the dropped half.
        let lows = [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000];
        let floats: Vec<f32> = every.iter().flat_map(|&h| lows.iter().map(move |&l| f32::from_bits((u32::from(h) << 16) | l))).collect();
        for isa in Isa::supported() {
            let mut wide = vec![0.0f32; every.len()];
            bf16_to_f32_in(isa, &every, &mut wide);
            for (h, w) in every.iter().zip(&wide) {
                assert_eq!(w.to_bits(), half::bf16::from_bits(*h).to_f32().to_bits(), "{:?} {h:#x}", isa.level());
            }
            let mut narrow = vec![0u16; floats.len()];
            f32_to_bf16_in(isa, &floats, &mut narrow);
            for (x, n) in floats.iter().zip(&narrow) {
                assert_eq!(*n, half::bf16::from_f32(*x).to_bits(), "{:?} {:#x}", isa.level(), x.to_bits());
            }
        }
    }

    #[test]
    fn every_isa_matches_the_portable_rows_on_every_tail() {
        let close = |a: f32, b: f32| (a - b).abs() <= 2e-6 * (1.0 + a.abs().max(b.abs()));
        for isa in Isa::supported() {
            for n in 0..70 {
                let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37).collect();
                let ys: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
                let name = isa.level().name();
                assert_eq!(max_in(isa, &xs), max_body::<false, 8>(&xs), "max {name} n={n}");
                assert!(close(dot_in(isa, &xs, &ys), dot_body::<false, 8>(&xs, &ys)), "dot {name} n={n}");
                let (mut a, mut b) = (xs.clone(), xs.clone());
                assert!(close(exp2_scaled_shift_sum_in(isa, &mut a, 0.8, 1.5), exp2_scaled_shift_sum_body::<false, 8>(&mut b, 0.8, 1.5)));
                assert!(a.iter().zip(&b).all(|(x, y)| close(*x, *y)), "exp2 {name} n={n}");
                for bias in [&[][..], &ys[..]] {
                    let (mut a, mut b) = (xs.clone(), xs.clone());
                    exp2_affine_in(isa, &mut a, 0.7, bias, 0.5);
                    exp2_affine_body::<false, 8>(&mut b, 0.7, bias, 0.5);
                    assert!(a.iter().zip(&b).all(|(x, y)| close(*x, *y)), "exp2_affine {name} n={n}");
                }
                let (mut a, mut b) = (xs.clone(), xs.clone());
                add_scaled_in(isa, &mut a, &ys, -1.25);
                add_scaled_body::<false, 8>(&mut b, &ys, -1.25);
                scale_in(isa, &mut a, 0.5);
                scale_body::<false, 8>(&mut b, 0.5);
                softmax_grad_in(isa, &mut a, &ys, 0.3);
                softmax_grad_body::<false, 8>(&mut b, &ys, 0.3);
                assert!(a.iter().zip(&b).all(|(x, y)| close(*x, *y)), "add/scale/grad {name} n={n}");
            }
        }
    }
}
