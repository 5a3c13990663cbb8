//! `2^(x − shift)` over a row, fully vectorised: rounding by the 1.5·2²³ magic number instead of a float→int cast
//! (Rust's saturating cast scalarises the loop), the Cephes polynomial on [−0.5, 0.5], 8 partial sums. Compiled for
//! AVX2+FMA and for the baseline, chosen at run time.

#[allow(clippy::excessive_precision)] // Cephes' exp2f coefficients as published
const P: [f32; 6] = [1.535_336_2e-4, 1.339_887_4e-3, 9.618_437_4e-3, 5.550_332_5e-2, 2.402_264_8e-1, 6.931_472e-1];
const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds |x| < 2^22 to an integer held in the low mantissa bits
const LANES: usize = 8;

/// `a·b + c`, fused where the caller is compiled with FMA (a libm call otherwise, so the baseline multiplies).
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `2^x`, 0 for x <= −127 (−∞ included).
#[inline(always)]
fn exp2_one<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-127.0, 127.0);
    let t = x + MAGIC;
    let n = t - MAGIC;
    let f = x - n;
    let mut p = P[0];
    for c in &P[1..] {
        p = mul_add::<FMA>(p, f, *c);
    }
    let exponent = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32) + 127;
    mul_add::<FMA>(f, p, 1.0) * f32::from_bits((exponent as u32) << 23)
}

#[inline(always)]
fn body<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn body_avx2(row: &mut [f32], shift: f32) -> f32 {
    body::<true>(row, shift)
}

fn has_avx2_fma() -> bool {
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

/// `row[i] = 2^(row[i] − shift)` (0 below 2^−127, so −∞ gives 0); returns the sum of the new values.
pub fn exp2_shift_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { body_avx2(row, shift) };
    }
    body::<false>(row, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_and_maps_minus_infinity_to_zero() {
        let mut xs: Vec<f32> = (-2100..=1600).map(|i| i as f32 * 0.0625).collect();
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64 - 1.0).exp2()).collect();
        let sum = exp2_shift_sum(&mut xs, 1.0) as f64;
        for (got, want) in xs.iter().zip(&want) {
            if *want > 1e-37 {
                assert!(((*got as f64) - want).abs() <= 4e-7 * want, "{got} vs {want}");
            }
        }
        let total: f64 = want.iter().sum();
        assert!((sum - total).abs() <= 1e-5 * total);
        let mut edge = [f32::NEG_INFINITY, 0.0, -200.0];
        assert_eq!(exp2_shift_sum(&mut edge, 0.0), 1.0);
        assert_eq!(edge, [0.0, 1.0, 0.0]);
    }
}
