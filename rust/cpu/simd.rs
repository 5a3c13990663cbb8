//! Vector math for the kernels: a small GEMM front (the `gemm` crate, which dispatches on CPU features at run
//! time) and a branch-free `exp2` that the compiler vectorises, compiled twice (AVX2+FMA and baseline) and
//! chosen at run time.

/// `dst (m x n) = [dst +] lhs (m x k) · rhs (k x n)`, all f32, strides in elements (row stride, column stride).
///
/// # Safety
/// Pointers must address matrices of the given sizes and strides; `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
#[inline]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

// Cephes' exp2f polynomial on [-0.5, 0.5]: 2^f = 1 + f * P(f).
const P: [f32; 6] = [1.535_336_2e-4, 1.339_887_4e-3, 9.618_437_4e-3, 5.550_332_5e-2, 2.402_264_8e-1, 6.931_472e-1];

#[inline(always)]
fn exp2_one(x: f32) -> f32 {
    let x = x.clamp(-127.0, 127.0);
    let n = (x + 0.5).floor();
    let f = x - n;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * f + c;
    }
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    (1.0 + f * p) * scale
}

const LANES: usize = 8;

/// Sum with `LANES` independent accumulators so the loop vectorises (float addition is not reassociated).
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
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
fn exp2_shift_sum_body(row: &mut [f32], shift: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp2_one(*x - shift);
    }
    lane_sum(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp2_shift_sum_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp2_shift_sum_body(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(row: &[f32]) -> f32 {
    lane_max(row)
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

/// `row[i] = 2^(row[i] - shift)` (−∞ and anything below 2^-127 give 0); returns the sum of the new values.
pub fn exp2_shift_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { exp2_shift_sum_avx2(row, shift) };
    }
    exp2_shift_sum_body(row, shift)
}

/// The largest value of `row` (−∞ when empty).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { max_avx2(row) };
    }
    lane_max(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_matches_std() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0625).collect();
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64 - 1.0).exp2()).collect();
        exp2_shift_sum(&mut xs, 1.0);
        for (got, want) in xs.iter().zip(want) {
            if want > 1e-37 {
                assert!(((*got as f64) - want).abs() <= 4e-7 * want, "{got} vs {want}");
            }
        }
        let mut neg = [f32::NEG_INFINITY, 0.0];
        let s = exp2_shift_sum(&mut neg, 0.0);
        assert_eq!(neg, [0.0, 1.0]);
        assert_eq!(s, 1.0);
    }

    #[test]
    fn matmul_small() {
        // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let mut c = [0.0f32; 4];
        unsafe { matmul(2, 2, 2, c.as_mut_ptr(), 2, false, a.as_ptr(), 2, 1, b.as_ptr(), 2, 1) };
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        unsafe { matmul(2, 2, 2, c.as_mut_ptr(), 2, true, a.as_ptr(), 2, 1, b.as_ptr(), 1, 2) };
        // + A · Bᵀ = [17 23; 39 53]
        assert_eq!(c, [36.0, 45.0, 82.0, 103.0]);
    }
}
