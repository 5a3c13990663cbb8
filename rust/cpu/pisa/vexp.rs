//! `2^x` over rows of logits, written so that every step vectorises (AVX2+FMA, chosen at run time): the power of
//! two comes from float arithmetic on the exponent bits (a float-to-int cast would be scalarised for its
//! saturation semantics). The same Cephes polynomial as `simd::exp2_shift_sum`.

// Cephes' exp2f polynomial on [-0.5, 0.5]: 2^f = 1 + f * P(f).
const P: [f32; 6] = [1.535_336_2e-4, 1.339_887_4e-3, 9.618_438e-3, 5.550_332_5e-2, 2.402_264_8e-1, 6.931_472e-1];
/// `2^23 + 127`: adding it to an integer-valued n in [-127, 127] leaves `n + 127` in the low mantissa bits.
const EXPONENT_MAGIC: f32 = 8_388_735.0;
const LANES: usize = 8;

/// `FMA`: contract the polynomial into fused multiply-adds (only where the target has them: without hardware FMA,
/// `mul_add` is a slow library call).
#[inline(always)]
fn exp2_one<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-127.0, 127.0);
    let n = (x + 0.5).floor();
    let f = x - n;
    let mut p = P[0];
    for c in &P[1..] {
        p = if FMA { p.mul_add(f, *c) } else { p * f + c };
    }
    // Bits `0x4B000000 | (n + 127)` shifted left by 23: the exponent field becomes n + 127, so the value is 2^n
    // (0 for n = -127, as the clamp of -inf gives).
    let scale = f32::from_bits((n + EXPONENT_MAGIC).to_bits() << 23);
    (if FMA { f.mul_add(p, 1.0) } else { 1.0 + f * p }) * scale
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

/// `row[i] = 2^(row[i] − shift)` (−∞ and anything below 2^-127 give 0); returns the sum of the new values.
pub fn exp2_shift_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        return unsafe { body_avx2(row, shift) };
    }
    body::<false>(row, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_and_handles_infinities() {
        let mut xs: Vec<f32> = (-2100..=1900).map(|i| i as f32 * 0.0625).collect();
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64 - 1.0).exp2()).collect();
        let sum = exp2_shift_sum(&mut xs, 1.0);
        for (got, want) in xs.iter().zip(&want) {
            if *want > 1e-37 && *want < 1e37 {
                assert!(((*got as f64) - want).abs() <= 4e-7 * want, "{got} vs {want}");
            }
        }
        assert!(sum.is_finite());
        let mut edge = [f32::NEG_INFINITY, 0.0, -500.0, 3.0, 1.0, 2.0, -1.0, 0.5, 0.25];
        exp2_shift_sum(&mut edge, 0.0);
        assert_eq!(&edge[..4], &[0.0, 1.0, 0.0, 8.0]);
        let mut plain = [-3.5f32, 0.0, 2.25, f32::NEG_INFINITY];
        body::<false>(&mut plain, 0.0);
        assert_eq!(plain[3], 0.0);
        assert!((plain[0] - 0.088_388_35).abs() < 1e-7 && (plain[2] - 4.756_828_5).abs() < 1e-6);
    }
}
