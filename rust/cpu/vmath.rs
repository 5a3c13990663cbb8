//! Element-wise vector math shared by every CPU kernel: branch-free `exp2` / `log2` that the compiler vectorises
//! (no float→int casts, whose saturating semantics scalarise a loop), row reductions with eight accumulators (a
//! single float accumulator cannot be reordered), and the AVX2+FMA run-time check. Row functions are compiled
//! twice, for AVX2+FMA and for the baseline, and chosen at run time; callers with their own row loops use the
//! `FMA`-generic pieces inside their own `#[target_feature]` clones.

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
fn exp2_shift_sum_body<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = exp2_one::<FMA>(*x - shift);
            *a += *x;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2_one::<FMA>(*x - shift);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max_body(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

#[inline(always)]
fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let split = n - n % LANES;
    let mut acc = [0.0f32; LANES];
    for (ac, bc) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(ac[l], bc[l], acc[l]);
        }
    }
    for i in split..n {
        acc[0] = madd::<FMA>(a[i], b[i], acc[0]);
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp2_shift_sum_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp2_shift_sum_body::<true>(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(row: &[f32]) -> f32 {
    max_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<true>(a, b)
}

/// Whether this CPU has AVX2 and FMA (detected once).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `row[i] = 2^(row[i] − shift)` (0 at or below 2^−127, so −∞ gives 0); returns the sum of the new values.
pub fn exp2_shift_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { exp2_shift_sum_avx2(row, shift) };
    }
    exp2_shift_sum_body::<false>(row, shift)
}

/// The largest value of `row` (−∞ when empty).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { max_avx2(row) };
    }
    max_body(row)
}

/// `Σ a_i b_i` over the shorter of the two.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    dot_body::<false>(a, b)
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
        exp2_shift_sum_body::<false>(&mut plain, 0.0);
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
}
