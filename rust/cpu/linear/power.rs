//! Block math of the DyDiLA power map `φ_γ(z) = ‖r‖ · r^γ / ‖r^γ‖`, `r = relu(z) + ε`, and its gradients, on the
//! shared `log2` / `exp2` of `vmath`, with reductions in eight accumulators so they vectorise.
//!
//! The functions take a block of rows (`rows x D`, row-major, one exponent per row). The forward makes two passes
//! over each row while it is in L1 (`r` with its norm and maximum, then `log2 r` and the power), which measured a
//! little faster than running each pass over the whole block. Each block function has a portable body (the
//! baseline, and the reference of the tests), an AVX2+FMA clone written with intrinsics (`avx2`) and an AVX-512
//! clone written with `__m512` intrinsics (`zmm`, the same operations per lane), chosen at run time once per block.

use crate::cpu::isa::{Isa, Level};
use crate::cpu::vmath::{exp2_one, log2_one, madd, LANES};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod zmm;

const LN_2: f32 = std::f32::consts::LN_2;

/// `(n1, n2) = (‖r‖, ‖p‖)` of one row, so `φ = (n1 / n2) · p`.
pub type Norms = (f32, f32);

/// The input rows `z` of the block functions: f32 values, or the bits of bf16 values, which only the AVX-512
/// clone reads as they are (see [`reads_bf16`]): converting them first was a pass over every row that waited on
/// memory (a tenth of DyDiLA's bf16 forward) where the clone's loads overlap its arithmetic.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Input<'a> {
    pub fn len(self) -> usize {
        match self {
            Input::F32(v) => v.len(),
            Input::Bf16(b) => b.len(),
        }
    }

    /// The f32 values, for the clones that read only those; panics on bf16 (a caller bug: see [`reads_bf16`]).
    fn f32s(self) -> &'a [f32] {
        match self {
            Input::F32(v) => v,
            Input::Bf16(_) => panic!("power block: bf16 inputs on a level that reads only f32"),
        }
    }
}

/// The gradient rows `dz` the block functions write: f32 values, or bf16 bits (rounded to nearest even as
/// `vmath::f32_to_bf16` rounds), which only the AVX-512 clone writes (see [`reads_bf16`]): writing f32 and then
/// converting them was a pass over every gradient row of the backward.
#[derive(Debug)]
pub enum Output<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
}

impl<'a> Output<'a> {
    pub fn len(&self) -> usize {
        match self {
            Output::F32(v) => v.len(),
            Output::Bf16(b) => b.len(),
        }
    }

    /// The f32 values, for the clones that write only those; panics on bf16 (a caller bug: see [`reads_bf16`]).
    fn f32s(self) -> &'a mut [f32] {
        match self {
            Output::F32(v) => v,
            Output::Bf16(_) => panic!("power block: bf16 outputs on a level that writes only f32"),
        }
    }
}

/// Whether the block functions take [`Input::Bf16`] and [`Output::Bf16`] on the level in use (else the caller
/// converts the rows).
pub fn reads_bf16() -> bool {
    cfg!(target_arch = "x86_64") && Isa::current().level() >= Level::Avx512
}

fn lanes_sum<const W: usize>(acc: [f32; W]) -> f32 {
    acc.iter().sum()
}

fn lanes_max<const W: usize>(acc: [f32; W]) -> f32 {
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `r = relu(z) + ε` (the same expression in the forward and in the backward). A NaN `z` stays NaN, as torch's
/// relu keeps it (`f32::max` would drop it).
#[inline(always)]
fn shifted_relu(z: f32, eps: f32) -> f32 {
    (if z < 0.0 { 0.0 } else { z }) + eps
}

/// Pass 1 of one row: `r = max(relu(z) + ε, f32::MIN_POSITIVE)` into `r_out` (the clamp keeps `log2 r` finite for
/// ε = 0); returns `(‖r‖, max r)`.
#[inline(always)]
fn relu_row<const FMA: bool, const W: usize>(z: &[f32], eps: f32, r_out: &mut [f32]) -> (f32, f32) {
    let mut r2 = [0.0f32; W];
    let mut rmax = [0.0f32; W];
    let mut step = |zi: f32, ri: &mut f32, l: usize| {
        let x = shifted_relu(zi, eps);
        let x = if x < f32::MIN_POSITIVE { f32::MIN_POSITIVE } else { x }; // NaN passes (the row's norms go NaN)
        r2[l] = madd::<FMA>(x, x, r2[l]);
        rmax[l] = rmax[l].max(x);
        *ri = x;
    };
    let split = z.len() - z.len() % W;
    for (zc, rc) in z[..split].chunks_exact(W).zip(r_out[..split].chunks_exact_mut(W)) {
        for l in 0..W {
            step(zc[l], &mut rc[l], l);
        }
    }
    for (zi, ri) in z[split..].iter().zip(&mut r_out[split..]) {
        step(*zi, ri, 0);
    }
    (lanes_sum(r2).sqrt(), lanes_max(rmax))
}

/// Pass 2 of one row: `ls = log2 r` in place over pass 1's `r`, and `p = 2^(γ·(ls − shift))`; returns `‖p‖`.
#[inline(always)]
fn power_row<const FMA: bool, const W: usize>(gamma: f32, shift: f32, ls: &mut [f32], p: &mut [f32]) -> f32 {
    let mut p2 = [0.0f32; W];
    let offset = -gamma * shift;
    let mut step = |li: &mut f32, pi: &mut f32, l: usize| {
        *li = log2_one::<FMA>(*li);
        *pi = exp2_one::<FMA>(madd::<FMA>(gamma, *li, offset));
        p2[l] = madd::<FMA>(*pi, *pi, p2[l]);
    };
    let split = ls.len() - ls.len() % W;
    for (lc, pc) in ls[..split].chunks_exact_mut(W).zip(p[..split].chunks_exact_mut(W)) {
        for l in 0..W {
            step(&mut lc[l], &mut pc[l], l);
        }
    }
    for (li, pi) in ls[split..].iter_mut().zip(&mut p[split..]) {
        step(li, pi, 0);
    }
    lanes_sum(p2).sqrt()
}

/// The parts of `φ_γ(z)` for a block of rows: `ls = log2 r` and `p = (r / max r)^γ = 2^(γ·(ls − log2 max r))`
/// (`rows x D` each, with `rows = gamma.len()`), and `norms` per row. Dividing by `max r` keeps every power <= 1
/// (no overflow for any γ >= 0) and does not change the map.
#[inline(always)]
fn power_rows_body<const FMA: bool, const W: usize>(z: &[f32], gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    let d = z.len() / gamma.len().max(1);
    let rows = z.chunks_exact(d).zip(ls.chunks_exact_mut(d)).zip(p.chunks_exact_mut(d));
    for (((zr, lr), pr), (n, &g)) in rows.zip(norms.iter_mut().zip(gamma)) {
        let (n1, rmax) = relu_row::<FMA, W>(zr, eps, lr);
        *n = (n1, power_row::<FMA, W>(g, log2_one::<FMA>(rmax), lr, pr));
    }
}

/// Where a power counts as large: powers are taken relative to the row's largest `r`, so the largest is ≈ 1.
const LARGE: f32 = 0.5;

/// The sums [`projection`] rebuilds `G − u (G·u)` from, split at [`LARGE`]: `[Σ p², Σ g·p]` over the small
/// powers, then over the large ones (plain products, so a lone large entry's sum is bit-equal to its own term).
#[inline(always)]
fn split_sums(g: &[f32], p: &[f32]) -> [f32; 4] {
    let (mut small2, mut small_g, mut large2, mut large_g) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let mut step = |gi: f32, pi: f32, l: usize| {
        let (own2, own_g) = (pi * pi, gi * pi);
        let large = pi > LARGE;
        large2[l] += if large { own2 } else { 0.0 };
        large_g[l] += if large { own_g } else { 0.0 };
        small2[l] += if large { 0.0 } else { own2 };
        small_g[l] += if large { 0.0 } else { own_g };
    };
    let split = p.len() - p.len() % LANES;
    for (gc, pc) in g[..split].chunks_exact(LANES).zip(p[..split].chunks_exact(LANES)) {
        for l in 0..LANES {
            step(gc[l], pc[l], l);
        }
    }
    for (gi, pi) in g[split..].iter().zip(&p[split..]) {
        step(*gi, *pi, 0);
    }
    [lanes_sum(small2), lanes_sum(small_g), lanes_sum(large2), lanes_sum(large_g)]
}

/// `(G − u (G·u))_i · ‖p‖²` (`u = p / ‖p‖`) from sums over the other entries: `g_i Σ_{j≠i} p_j² − p_i Σ_{j≠i} g_j
/// p_j`. Where one power dominates the row (large γ: `u ≈ e_k`) the direct form cancels to a rounding error that
/// the gradient then multiplies by γ (dq off by 0.16 at γ = 1e6); here entry i leaves its own group's sum, a lone
/// large entry exactly, so nothing cancels.
#[inline(always)]
fn projection(gi: f32, pi: f32, sums: &[f32; 4]) -> f32 {
    let [small2, small_g, large2, large_g] = *sums;
    let (own2, own_g) = (pi * pi, gi * pi);
    let (l2, lg) = if pi > LARGE { (own2, own_g) } else { (0.0, 0.0) };
    let others2 = (small2 - (own2 - l2)) + (large2 - l2);
    let others_g = (small_g - (own_g - lg)) + (large_g - lg);
    gi * others2 - pi * others_g
}

/// Gradients of one power map given `G = ∂L/∂φ` (written with `u = p / n2`):
/// `∂L/∂r = (G·u) r / n1 + γ n1 (u / r) ⊙ (G − u (G·u))`, `∂L/∂z = ∂L/∂r ⊙ 1[z > 0]`,
/// `∂L/∂γ = n1 Σ (G − u (G·u)) ⊙ u ⊙ ln r` (`ls = log2 r`, so `ln r = ls · ln 2`). Writes `dz` of one row and
/// returns `∂L/∂γ`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_row<const FMA: bool, const W: usize>(z: &[f32], g: &[f32], gamma: f32, eps: f32, ls: &[f32], p: &[f32], norms: Norms, dz: &mut [f32]) -> f32 {
    let (n1, n2) = norms;
    let inv_n2 = 1.0 / n2;
    let sums = split_sums(g, p);
    let gu = (sums[1] + sums[3]) * inv_n2;
    let (a, b, inv_n2_sq) = (gu / n1, gamma * n1, inv_n2 * inv_n2);
    let mut dgamma = [0.0f32; W];
    let mut step = |i: usize, l: usize| {
        let r = shifted_relu(z[i], eps);
        let u = p[i] * inv_n2;
        let proj = projection(g[i], p[i], &sums) * inv_n2_sq;
        let dr = madd::<FMA>(a, r, b * (u / r) * proj);
        dz[i] = if z[i] > 0.0 { dr } else { 0.0 };
        dgamma[l] = madd::<FMA>(proj * u, ls[i], dgamma[l]);
    };
    let d = z.len();
    let split = d - d % W;
    for c in (0..split).step_by(W) {
        for l in 0..W {
            step(c + l, l);
        }
    }
    for i in split..d {
        step(i, 0);
    }
    n1 * lanes_sum(dgamma) * LN_2
}

/// [`grad_row`] over a block: `g`, `z`, `ls`, `p`, `dz` are `rows x D`, `gamma`, `norms`, `dgamma` per row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn power_rows_grad_body<const FMA: bool, const W: usize>(
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
        *dg = grad_row::<FMA, W>(zr, gr, ga, eps, lr, pr, n, dzr);
    }
}

/// Panics unless the block buffers hold `gamma.len() >= 1` rows of the same width `>= 1` (a caller bug, not user
/// data: the kernels size them from validated shapes).
fn check_block(gamma: &[f32], row_buffers: &[usize], per_row: &[usize]) {
    let rows = gamma.len();
    let width = row_buffers[0] / rows.max(1);
    assert!(rows > 0 && width > 0, "power block: empty block");
    assert!(row_buffers.iter().all(|&len| len == rows * width), "power block: buffers of {rows} rows disagree");
    assert!(per_row.iter().all(|&len| len == rows), "power block: per-row buffers disagree");
}


/// See [`power_rows_body`]: fills `ls`, `p` (`rows x D`, like `z`) and `norms` for `rows = gamma.len()` rows.
pub fn power_rows(z: Input, gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    power_rows_in(Isa::current(), z, gamma, eps, ls, p, norms)
}

/// [`power_rows`] on the level `isa`: the `__m512` intrinsics on the AVX-512 levels, the AVX2 ones on AVX2, else the
/// portable body. (The portable body compiled for 16 lanes measured 1.15x slower than the AVX2 clone on the Zen 4
/// test machine: its lane-array reductions became shuffles and a scalar loop; the `zmm` clone measured 1.05x faster.)
fn power_rows_in(isa: Isa, z: Input, gamma: &[f32], eps: f32, ls: &mut [f32], p: &mut [f32], norms: &mut [Norms]) {
    check_block(gamma, &[z.len(), ls.len(), p.len()], &[norms.len()]);
    #[cfg(target_arch = "x86_64")]
    if isa.level() >= Level::Avx512 {
        // SAFETY: an `Isa` holds only a level whose features this CPU has, here at least AVX-512 F/BW/DQ/VL, AVX2,
        // FMA.
        return unsafe { zmm::power_rows(z, gamma, eps, ls, p, norms) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa.level() >= Level::Avx2 {
        // SAFETY: an `Isa` holds only a level whose features this CPU has, here at least AVX2 and FMA.
        return unsafe { avx2::power_rows(z.f32s(), gamma, eps, ls, p, norms) };
    }
    power_rows_body::<false, LANES>(z.f32s(), gamma, eps, ls, p, norms)
}

/// See [`grad_row`]: from [`power_rows`]' `ls`, `p`, `norms` and `g = ∂L/∂φ`, writes `dz` (`rows x D`) and
/// `dgamma` (per row).
#[allow(clippy::too_many_arguments)]
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
    power_rows_grad_in(Isa::current(), z, g, gamma, eps, ls, p, norms, dz, dgamma)
}

/// [`power_rows_grad`] on the level `isa` (the clones as for [`power_rows_in`]).
#[allow(clippy::too_many_arguments)]
fn power_rows_grad_in(
    isa: Isa,
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
    check_block(gamma, &[z.len(), g.len(), ls.len(), p.len(), dz.len()], &[norms.len(), dgamma.len()]);
    #[cfg(target_arch = "x86_64")]
    if isa.level() >= Level::Avx512 {
        // SAFETY: an `Isa` holds only a level whose features this CPU has, here at least AVX-512 F/BW/DQ/VL, AVX2,
        // FMA.
        return unsafe { zmm::power_rows_grad(z, g, gamma, eps, ls, p, norms, dz, dgamma) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa.level() >= Level::Avx2 {
        // SAFETY: an `Isa` holds only a level whose features this CPU has, here at least AVX2 and FMA.
        return unsafe { avx2::power_rows_grad(z.f32s(), g, gamma, eps, ls, p, norms, dz.f32s(), dgamma) };
    }
    power_rows_grad_body::<false, LANES>(z.f32s(), g, gamma, eps, ls, p, norms, dz.f32s(), dgamma)
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
    fn power_rows_match_the_definition_and_their_gradients_match_finite_differences() {
        // Three rows of 19 (a tail after two full lanes), different exponents.
        let (rows, d, eps) = (3, 19, 1e-6f32);
        let z: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 11) as f32 - 4.0) * 0.3 + 0.05).collect();
        let g: Vec<f32> = (0..rows * d).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
        let gamma = [2.7f32, 1.0, 4.2];
        let (mut ls, mut p, mut dz) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows * d]);
        let (mut norms, mut dgamma) = (vec![(0.0, 0.0); rows], vec![0.0; rows]);
        power_rows(Input::F32(&z), &gamma, eps, &mut ls, &mut p, &mut norms);
        power_rows_grad(Input::F32(&z), &g, &gamma, eps, &ls, &p, &norms, Output::F32(&mut dz), &mut dgamma);
        for row in 0..rows {
            let (zr, gr, at) = (&z[row * d..(row + 1) * d], &g[row * d..(row + 1) * d], row * d);
            let (n1, n2) = norms[row];
            let want = naive_power(zr, gamma[row] as f64, eps as f64);
            for (i, w) in want.iter().enumerate() {
                assert!(((n1 / n2 * p[at + i]) as f64 - w).abs() < 1e-5 * (1.0 + w.abs()));
            }
            let loss = |z: &[f32], gamma: f64| -> f64 { naive_power(z, gamma, eps as f64).iter().zip(gr).map(|(a, b)| a * *b as f64).sum() };
            let h = 1e-3;
            let fd_gamma = (loss(zr, gamma[row] as f64 + h) - loss(zr, gamma[row] as f64 - h)) / (2.0 * h);
            assert!((dgamma[row] as f64 - fd_gamma).abs() < 1e-3 * (1.0 + fd_gamma.abs()), "{} vs {fd_gamma}", dgamma[row]);
            for i in 0..d {
                let (mut zp, mut zm) = (zr.to_vec(), zr.to_vec());
                zp[i] += h as f32;
                zm[i] -= h as f32;
                let fd = (loss(&zp, gamma[row] as f64) - loss(&zm, gamma[row] as f64)) / (2.0 * h);
                assert!((dz[at + i] as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()), "dz[{row}, {i}] {} vs {fd}", dz[at + i]);
            }
        }
    }

    #[test]
    fn vector_paths_match_the_portable_body_on_every_tail() {
        let eps = 1e-6f32;
        for d in 1..=80 {
            // A group of four rows (the AVX-512 forward maps four side by side) and a single row after it.
            let rows = 5;
            // Negatives, zeros and positives; exponents across [0, 4].
            let z: Vec<f32> = (0..rows * d).map(|i| if i % 5 == 0 { 0.0 } else { ((i * 37 % 23) as f32 - 9.0) * 0.17 }).collect();
            let g: Vec<f32> = (0..rows * d).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
            let gamma = [0.0f32, 1.7, 4.0, 2.3, 0.9];
            let run = |isa: Option<Isa>| {
                let (mut ls, mut p, mut dz) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows * d]);
                let (mut norms, mut dgamma) = (vec![(0.0, 0.0); rows], vec![0.0; rows]);
                if let Some(isa) = isa {
                    power_rows_in(isa, Input::F32(&z), &gamma, eps, &mut ls, &mut p, &mut norms);
                    power_rows_grad_in(isa, Input::F32(&z), &g, &gamma, eps, &ls, &p, &norms, Output::F32(&mut dz), &mut dgamma);
                } else {
                    power_rows_body::<true, 8>(&z, &gamma, eps, &mut ls, &mut p, &mut norms);
                    power_rows_grad_body::<true, 8>(&z, &g, &gamma, eps, &ls, &p, &norms, &mut dz, &mut dgamma);
                }
                (ls, p, norms, dz, dgamma)
            };
            let want = run(None);
            for got in Isa::supported().into_iter().map(|isa| run(Some(isa))) {
                let close = |a: f32, b: f32, tol: f32| (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()));
                for i in 0..rows * d {
                    assert!(close(want.0[i], got.0[i], 1e-6), "ls d={d} i={i}: {} vs {}", want.0[i], got.0[i]);
                    assert!(close(want.1[i], got.1[i], 1e-6), "p d={d} i={i}: {} vs {}", want.1[i], got.1[i]);
                    assert!(close(want.3[i], got.3[i], 1e-5), "dz d={d} i={i}: {} vs {}", want.3[i], got.3[i]);
                }
                for r in 0..rows {
                    assert!(close(want.2[r].0, got.2[r].0, 1e-6) && close(want.2[r].1, got.2[r].1, 1e-6), "norms d={d}");
                    assert!(close(want.4[r], got.4[r], 1e-5), "dgamma d={d}: {} vs {}", want.4[r], got.4[r]);
                }
            }
        }
    }

    #[test]
    fn bf16_inputs_read_as_they_are_match_their_f32_values() {
        // Every level that reads bf16 rows: the same bits as from the rows converted first, over lengths around the
        // vector width, with a signalling and a quiet NaN, infinities, zeros and negatives among them.
        let Some(isas) = reads_bf16().then(|| Isa::supported().into_iter().filter(|i| i.level() >= Level::Avx512)) else {
            eprintln!("skipped: this level reads bf16 rows only after converting them");
            return;
        };
        let isas: Vec<Isa> = isas.collect();
        let eps = 1e-6f32;
        for d in (1..=40).chain([47, 63, 64, 65]) {
            let rows = 5;
            let mut bits: Vec<u16> = (0..rows * d).map(|i| half::bf16::from_f32(((i * 29 % 17) as f32 - 7.0) * 0.21).to_bits()).collect();
            let at = |row: usize| row * d + (row * 7 + 3) % d;
            bits[at(0)] = 0x7f81; // signalling NaN
            bits[at(1)] = 0x7f80; // +inf
            bits[at(2)] = 0xff80; // -inf
            bits[at(4)] = 0xffc1; // quiet NaN, sign set
            let z: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
            let g: Vec<f32> = (0..rows * d).map(|i| ((i * 11 % 9) as f32 - 4.0) * 0.3).collect();
            let gamma = [1.5f32, 3.0, 2.2, 0.7, 1.1];
            for &isa in &isas {
                let run = |z: Input| {
                    let (mut ls, mut p, mut dz) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows * d]);
                    let (mut norms, mut dgamma) = (vec![(0.0, 0.0); rows], vec![0.0; rows]);
                    power_rows_in(isa, z, &gamma, eps, &mut ls, &mut p, &mut norms);
                    power_rows_grad_in(isa, z, &g, &gamma, eps, &ls, &p, &norms, Output::F32(&mut dz), &mut dgamma);
                    let (n1, n2): (Vec<f32>, Vec<f32>) = norms.into_iter().unzip();
                    [ls, p, dz, n1, n2, dgamma]
                };
                let (want, got) = (run(Input::F32(&z)), run(Input::Bf16(&bits)));
                for (k, (w, o)) in want.iter().zip(&got).enumerate() {
                    for (i, (&a, &b)) in w.iter().zip(o).enumerate() {
                        assert!((a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(), "{isa:?} d={d} output {k} [{i}]: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_gradients_written_directly_match_their_f32_values_rounded() {
        // Every level that writes bf16 rows: the bits `vmath::f32_to_bf16` makes of the f32 gradient, over lengths
        // around the vector width, with NaN and infinite inputs among finite ones (NaN and infinite gradients).
        let Some(isas) = reads_bf16().then(|| Isa::supported().into_iter().filter(|i| i.level() >= Level::Avx512)) else {
            eprintln!("skipped: this level writes bf16 rows only after converting them");
            return;
        };
        let isas: Vec<Isa> = isas.collect();
        let eps = 1e-6f32;
        for d in (1..=40).chain([47, 63, 64, 65]) {
            let rows = 5;
            let mut z: Vec<f32> = (0..rows * d).map(|i| ((i * 29 % 17) as f32 - 7.0) * 0.21).collect();
            let g: Vec<f32> = (0..rows * d).map(|i| ((i * 11 % 9) as f32 - 4.0) * 0.3 + i as f32 * 1e-3).collect();
            let at = |row: usize| row * d + (row * 7 + 3) % d;
            z[at(0)] = f32::NAN;
            z[at(1)] = f32::INFINITY;
            let gamma = [1.5f32, 3.0, 2.2, 0.7, 1.1];
            for &isa in &isas {
                let (mut ls, mut p, mut dz) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows * d]);
                let (mut norms, mut dgamma) = (vec![(0.0, 0.0); rows], vec![0.0; rows]);
                power_rows_in(isa, Input::F32(&z), &gamma, eps, &mut ls, &mut p, &mut norms);
                power_rows_grad_in(isa, Input::F32(&z), &g, &gamma, eps, &ls, &p, &norms, Output::F32(&mut dz), &mut dgamma);
                let mut want = vec![0u16; rows * d];
                crate::cpu::vmath::f32_to_bf16(&dz, &mut want);
                let mut got = vec![0x5555u16; rows * d];
                power_rows_grad_in(isa, Input::F32(&z), &g, &gamma, eps, &ls, &p, &norms, Output::Bf16(&mut got), &mut dgamma);
                assert_eq!(want, got, "{isa:?} d={d}");
            }
        }
    }

    /// Both outputs of every row on the level `isa`, or of the portable body (with FMA, as the vector clones).
    fn run_rows(isa: Option<Isa>, z: &[f32], g: &[f32], gamma: &[f32], eps: f32) -> Vec<Vec<f32>> {
        let (rows, n) = (gamma.len(), z.len());
        let (mut ls, mut p, mut dz) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let (mut norms, mut dgamma) = (vec![(0.0, 0.0); rows], vec![0.0; rows]);
        if let Some(isa) = isa {
            power_rows_in(isa, Input::F32(z), gamma, eps, &mut ls, &mut p, &mut norms);
            power_rows_grad_in(isa, Input::F32(z), g, gamma, eps, &ls, &p, &norms, Output::F32(&mut dz), &mut dgamma);
        } else {
            power_rows_body::<true, 8>(z, gamma, eps, &mut ls, &mut p, &mut norms);
            power_rows_grad_body::<true, 8>(z, g, gamma, eps, &ls, &p, &norms, &mut dz, &mut dgamma);
        }
        let (n1, n2) = norms.into_iter().unzip();
        vec![ls, p, dz, n1, n2, dgamma]
    }

    #[test]
    fn vector_paths_keep_the_portable_nan_pattern_and_split_sums_bit_equal() {
        // Lengths around the 8- and 16-lane widths (tails of every size after 0, 1 and 2 full zmm vectors), rows
        // with a NaN or an infinite input among finite ones, a clean row, and a NaN again in the row after the
        // AVX-512 forward's group of four; NaN where the portable body has NaN, the same infinities, finite values
        // close.
        let eps = 1e-6f32;
        for d in (1..=40).chain([47, 63, 64, 65]) {
            let rows = 5;
            let mut z: Vec<f32> = (0..rows * d).map(|i| ((i * 29 % 17) as f32 - 7.0) * 0.21).collect();
            let g: Vec<f32> = (0..rows * d).map(|i| ((i * 11 % 9) as f32 - 4.0) * 0.3).collect();
            let at = |row: usize| row * d + (row * 7 + 3) % d;
            z[at(0)] = f32::NAN;
            z[at(1)] = f32::INFINITY;
            z[at(2)] = f32::NEG_INFINITY;
            z[at(4)] = f32::NAN;
            let gamma = [1.5f32, 3.0, 2.2, 0.7, 1.1];
            let want = run_rows(None, &z, &g, &gamma, eps);
            for isa in Isa::supported() {
                let got = run_rows(Some(isa), &z, &g, &gamma, eps);
                for (k, (w, o)) in want.iter().zip(&got).enumerate() {
                    for (i, (&a, &b)) in w.iter().zip(o).enumerate() {
                        let same = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()));
                        assert!(same, "{isa:?} d={d} output {k} [{i}]: portable {a} vs {b}");
                    }
                }
            }
        }
        // The split sums: bit-equal on every level, over every length and a mix of large and small powers.
        for d in 1..=70 {
            let p: Vec<f32> = (0..d).map(|i| ((i * 37 % 19) as f32 / 19.0).powi(3) * 1.3).collect();
            let g: Vec<f32> = (0..d).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.37).collect();
            let want = split_sums(&g, &p);
            for isa in Isa::supported() {
                #[cfg(target_arch = "x86_64")]
                let got = if isa.level() >= Level::Avx512 {
                    // SAFETY: an `Isa` holds only a level whose features this CPU has, here AVX-512 F/DQ/VL.
                    unsafe { zmm::split_sums(&g, &p) }
                } else if isa.level() >= Level::Avx2 {
                    // SAFETY: an `Isa` holds only a level whose features this CPU has, here AVX2 and FMA.
                    unsafe { avx2::split_sums(&g, &p) }
                } else {
                    want
                };
                #[cfg(not(target_arch = "x86_64"))]
                let got = want;
                assert_eq!(want.map(f32::to_bits), got.map(f32::to_bits), "{isa:?} d={d}");
            }
        }
    }
}

