//! Row math of the DyDiLA power map `φ_γ(z) = ‖r‖ · r^γ / ‖r^γ‖`, `r = relu(z) + ε`: branch-free `log2` / `exp2`
//! that the compiler vectorises, and reductions written with eight accumulators so they vectorise too (float sums
//! in one accumulator cannot be reordered). Each row function is compiled twice (AVX2+FMA and baseline) and
//! chosen at run time.

const LANES: usize = 8;
const SQRT_2: f32 = std::f32::consts::SQRT_2;
const LN_2: f32 = std::f32::consts::LN_2;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
// Cephes' exp2f polynomial on [-0.5, 0.5]: 2^f = 1 + f · P(f).
const EXP2_P: [f32; 6] = [1.535_336_2e-4, 1.339_887_4e-3, 9.618_438e-3, 5.550_332_5e-2, 2.402_264_8e-1, 6.931_472e-1];

/// `a·b + c`, fused where the FMA clone is compiled (a libm call would be slower than two operations).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

// Cephes' logf polynomial: ln(1 + x) = x − x²/2 + x³ · P(x) for 1 + x ∈ [√½, √2).
const LOG_P: [f32; 9] = [
    7.037_683_6e-2, -1.151_461e-1, 1.167_699_9e-1, -1.242_014_1e-1, 1.424_932_3e-1, -1.666_805_8e-1, 2.000_071_4e-1,
    -2.499_999_4e-1, 3.333_333e-1,
];

/// `log2(x)` for finite `x >= f32::MIN_POSITIVE` (callers clamp), branch-free and division-free: exponent plus
/// `ln` of the mantissa folded into `[√½, √2)`.
#[inline(always)]
fn log2_one<const FMA: bool>(x: f32) -> f32 {
    let bits = x.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let exponent = exponent + big as i32;
    let t = m - 1.0;
    // P(t) by Estrin's scheme: a shorter dependency chain than Horner's, so more of the row is in flight.
    let c = &LOG_P;
    let t2 = t * t;
    let t4 = t2 * t2;
    let p01 = madd::<FMA>(c[7], t, c[8]);
    let p23 = madd::<FMA>(c[5], t, c[6]);
    let p45 = madd::<FMA>(c[3], t, c[4]);
    let p67 = madd::<FMA>(c[1], t, c[2]);
    let low = madd::<FMA>(p23, t2, p01);
    let high = madd::<FMA>(madd::<FMA>(c[0], t2, p67), t2, p45);
    let p = madd::<FMA>(high, t4, low);
    let ln = madd::<FMA>(t2 * t, p, madd::<FMA>(-0.5, t2, t));
    madd::<FMA>(ln, LOG2_E, exponent as f32)
}

/// `2^x`; arguments below −126 give 2^−126 or less (never a denormal or NaN), above 127 are clamped.
#[inline(always)]
fn exp2_one<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-126.0, 127.0);
    let n = (x + 0.5).floor();
    let f = x - n;
    let mut p = EXP2_P[0];
    for c in &EXP2_P[1..] {
        p = madd::<FMA>(p, f, *c);
    }
    // `n` as an integer without a (saturating, scalarised) float-to-int cast: adding 1.5·2^23 puts it in the
    // low mantissa bits.
    let n = (n + 12_582_912.0).to_bits().wrapping_sub(0x4b40_0000) as i32;
    madd::<FMA>(f, p, 1.0) * f32::from_bits(((n + 127) as u32) << 23)
}

fn lanes_sum(acc: [f32; LANES]) -> f32 {
    acc.iter().sum()
}

/// The parts of `φ_γ(z)` for one row, all length D: `r`, `ls = log2(r / max r)` and `p = 2^(γ·ls)`.
/// Returns `(n1, n2) = (‖r‖, ‖p‖)`, so `φ = (n1 / n2) · p`. Dividing by `max r` keeps every power <= 1 (no
/// overflow for any γ >= 0) and does not change the map.
#[inline(always)]
fn power_row_body<const FMA: bool>(
    z: &[f32],
    gamma: f32,
    eps: f32,
    r: &mut [f32],
    ls: &mut [f32],
    p: &mut [f32],
) -> (f32, f32) {
    let d = z.len();
    let (r, ls, p) = (&mut r[..d], &mut ls[..d], &mut p[..d]);
    let mut rmax = [0.0f32; LANES];
    let mut r2 = [0.0f32; LANES];
    let split = d - d % LANES;
    for (zc, rc) in z[..split].chunks_exact(LANES).zip(r[..split].chunks_exact_mut(LANES)) {
        for l in 0..LANES {
            let x = zc[l].max(0.0) + eps;
            rc[l] = x;
            rmax[l] = if x > rmax[l] { x } else { rmax[l] };
            r2[l] = madd::<FMA>(x, x, r2[l]);
        }
    }
    for i in split..d {
        r[i] = z[i].max(0.0) + eps;
        rmax[0] = rmax[0].max(r[i]);
        r2[0] = madd::<FMA>(r[i], r[i], r2[0]);
    }
    let inv_max = 1.0 / rmax.iter().fold(0.0f32, |a, &b| a.max(b));
    let mut p2 = [0.0f32; LANES];
    // Two short loops rather than one long body: more independent iterations fit in the reorder window.
    for (rc, lc) in r[..split].chunks_exact(LANES).zip(ls[..split].chunks_exact_mut(LANES)) {
        for l in 0..LANES {
            lc[l] = log2_one::<FMA>((rc[l] * inv_max).max(f32::MIN_POSITIVE));
        }
    }
    for (lc, pc) in ls[..split].chunks_exact(LANES).zip(p[..split].chunks_exact_mut(LANES)) {
        for l in 0..LANES {
            pc[l] = exp2_one::<FMA>(gamma * lc[l]);
            p2[l] = madd::<FMA>(pc[l], pc[l], p2[l]);
        }
    }
    for i in split..d {
        ls[i] = log2_one::<FMA>((r[i] * inv_max).max(f32::MIN_POSITIVE));
        p[i] = exp2_one::<FMA>(gamma * ls[i]);
        p2[0] = madd::<FMA>(p[i], p[i], p2[0]);
    }
    (lanes_sum(r2).sqrt(), lanes_sum(p2).sqrt())
}

/// Gradients of one power map given `G = ∂L/∂φ` (the spec's formulas, written with `u = p / n2`):
/// `∂L/∂r = (G·u) r / n1 + γ n1 (u / r) ⊙ (G − u (G·u))`, `∂L/∂z = ∂L/∂r ⊙ 1[z > 0]`,
/// `∂L/∂γ = n1 Σ (G − u (G·u)) ⊙ u ⊙ ln(r / max r)` (the shift of `ln r` by `ln max r` drops out because
/// `G − u (G·u)` is orthogonal to `u`). Writes `dz` (length D) and returns `∂L/∂γ`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn power_row_grad_body<const FMA: bool>(
    z: &[f32],
    g: &[f32],
    gamma: f32,
    r: &[f32],
    ls: &[f32],
    p: &[f32],
    n1: f32,
    n2: f32,
    dz: &mut [f32],
) -> f32 {
    let d = z.len();
    let (g, r, ls, p, dz) = (&g[..d], &r[..d], &ls[..d], &p[..d], &mut dz[..d]);
    let inv_n2 = 1.0 / n2;
    let gu = dot(g, p) * inv_n2;
    let (a, b) = (gu / n1, gamma * n1);
    let mut dgamma = [0.0f32; LANES];
    let split = d - d % LANES;
    let mut step = |i: usize, l: usize| {
        let u = p[i] * inv_n2;
        let proj = madd::<FMA>(-u, gu, g[i]);
        let dr = madd::<FMA>(a, r[i], b * (u / r[i]) * proj);
        dz[i] = if z[i] > 0.0 { dr } else { 0.0 };
        dgamma[l] = madd::<FMA>(proj * u, ls[i], dgamma[l]);
    };
    for c in (0..split).step_by(LANES) {
        for l in 0..LANES {
            step(c + l, l);
        }
    }
    for i in split..d {
        step(i, 0);
    }
    n1 * lanes_sum(dgamma) * LN_2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn power_row_avx2(z: &[f32], gamma: f32, eps: f32, r: &mut [f32], ls: &mut [f32], p: &mut [f32]) -> (f32, f32) {
    power_row_body::<true>(z, gamma, eps, r, ls, p)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn power_row_grad_avx2(
    z: &[f32],
    g: &[f32],
    gamma: f32,
    r: &[f32],
    ls: &[f32],
    p: &[f32],
    n1: f32,
    n2: f32,
    dz: &mut [f32],
) -> f32 {
    power_row_grad_body::<true>(z, g, gamma, r, ls, p, n1, n2, dz)
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

/// See [`power_row_body`]: fills `r`, `ls`, `p` (each at least `z.len()` long) and returns `(‖r‖, ‖p‖)`.
pub fn power_row(z: &[f32], gamma: f32, eps: f32, r: &mut [f32], ls: &mut [f32], p: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { power_row_avx2(z, gamma, eps, r, ls, p) };
    }
    power_row_body::<false>(z, gamma, eps, r, ls, p)
}

/// See [`power_row_grad_body`]: writes `dz` and returns `∂L/∂γ` of one row.
#[allow(clippy::too_many_arguments)]
pub fn power_row_grad(
    z: &[f32],
    g: &[f32],
    gamma: f32,
    r: &[f32],
    ls: &[f32],
    p: &[f32],
    n1: f32,
    n2: f32,
    dz: &mut [f32],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { power_row_grad_avx2(z, g, gamma, r, ls, p, n1, n2, dz) };
    }
    power_row_grad_body::<false>(z, g, gamma, r, ls, p, n1, n2, dz)
}

/// `Σ a_i b_i` with eight accumulators (vectorises).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let split = n - n % LANES;
    let mut acc = [0.0f32; LANES];
    for (ac, bc) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    for i in split..n {
        acc[0] += a[i] * b[i];
    }
    lanes_sum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_and_exp2_match_std() {
        let mut x = f32::MIN_POSITIVE;
        while x < 1e30 {
            let want = (x as f64).log2();
            assert!((log2_one::<false>(x) as f64 - want).abs() <= 2e-7 * want.abs().max(1.0), "log2({x})");
            x *= 1.37;
        }
        for i in -2000..=2000 {
            let x = i as f32 * 0.06;
            let want = (x as f64).exp2();
            assert!(((exp2_one::<false>(x) as f64) - want).abs() <= 4e-7 * want, "exp2({x})");
        }
        assert!(exp2_one::<false>(-1e9) > 0.0 && exp2_one::<false>(-1e9) < 1.2e-38);
    }

    fn naive_power(z: &[f32], gamma: f64, eps: f64) -> Vec<f64> {
        let r: Vec<f64> = z.iter().map(|&x| (x as f64).max(0.0) + eps).collect();
        let p: Vec<f64> = r.iter().map(|x| x.powf(gamma)).collect();
        let (n1, n2) = (r.iter().map(|x| x * x).sum::<f64>().sqrt(), p.iter().map(|x| x * x).sum::<f64>().sqrt());
        p.iter().map(|x| n1 * x / n2).collect()
    }

    #[test]
    fn power_row_matches_the_definition_and_its_gradients_match_finite_differences() {
        let z: Vec<f32> = (0..19).map(|i| ((i * 37 % 11) as f32 - 4.0) * 0.3 + 0.05).collect();
        let g: Vec<f32> = (0..19).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
        let (gamma, eps) = (2.7f32, 1e-6f32);
        let (mut r, mut ls, mut p, mut dz) = (vec![0.0; 19], vec![0.0; 19], vec![0.0; 19], vec![0.0; 19]);
        let (n1, n2) = power_row(&z, gamma, eps, &mut r, &mut ls, &mut p);
        let want = naive_power(&z, gamma as f64, eps as f64);
        for (i, w) in want.iter().enumerate() {
            assert!(((n1 / n2 * p[i]) as f64 - w).abs() < 1e-5 * (1.0 + w.abs()));
        }
        let dgamma = power_row_grad(&z, &g, gamma, &r, &ls, &p, n1, n2, &mut dz);
        let loss = |z: &[f32], gamma: f64| -> f64 { naive_power(z, gamma, eps as f64).iter().zip(&g).map(|(a, b)| a * *b as f64).sum() };
        let h = 1e-3;
        let fd_gamma = (loss(&z, gamma as f64 + h) - loss(&z, gamma as f64 - h)) / (2.0 * h);
        assert!((dgamma as f64 - fd_gamma).abs() < 1e-3 * (1.0 + fd_gamma.abs()), "{dgamma} vs {fd_gamma}");
        for i in 0..19 {
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[i] += h as f32;
            zm[i] -= h as f32;
            let fd = (loss(&zp, gamma as f64) - loss(&zm, gamma as f64)) / (2.0 * h);
            assert!((dz[i] as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()), "dz[{i}] {} vs {fd}", dz[i]);
        }
    }
}
