//! Row math of the DyDiLA power map `φ_γ(z) = ‖r‖ · r^γ / ‖r^γ‖`, `r = relu(z) + ε`, and its gradients, on the
//! shared `log2` / `exp2` of `vmath`, with reductions in eight accumulators so they vectorise. Each row function
//! is compiled twice (AVX2+FMA and baseline) and chosen at run time.

use crate::cpu::vmath::{exp2_one, has_avx2_fma, log2_one, madd, LANES};

const LN_2: f32 = std::f32::consts::LN_2;

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
    let gu = crate::cpu::vmath::dot(g, p) * inv_n2;
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

#[cfg(test)]
mod tests {
    use super::*;

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
