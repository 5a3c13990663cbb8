//! Row math of the linear core over whole blocks of rows (`rows x D`, row-major): DyDiLA's token differential and
//! its gradient, and sums of rows. Each is compiled per instruction set (`isa_dispatch!`) and dispatched once per
//! block: per-row calls of `vmath`'s functions (or loops compiled for the baseline) cost up to a twentieth of
//! DyDiLA's forward on the short rows (D = 64) of a DiT head.

use crate::cpu::isa::Isa;
use crate::cpu::vmath::madd;

#[inline(always)]
fn differential_body<const FMA: bool, const W: usize>(x: &[f32], y: &[f32], coefs: &[(f32, f32)], dst: &mut [f32]) {
    let d = x.len() / coefs.len().max(1);
    let rows = x.chunks_exact(d).zip(y.chunks_exact(d)).zip(dst.chunks_exact_mut(d));
    for (((xr, yr), o), &(a, b)) in rows.zip(coefs) {
        for ((oc, xc), yc) in o.chunks_mut(W).zip(xr.chunks(W)).zip(yr.chunks(W)) {
            for ((o, &x), &y) in oc.iter_mut().zip(xc).zip(yc) {
                *o = madd::<FMA>(a, x, -(b * y));
            }
        }
    }
}

#[inline(always)]
fn differential_grad_body<const FMA: bool, const W: usize>(g: &[f32], y: &[f32], lambda: &[f32], g_aux: &mut [f32], dots: &mut [f32]) {
    let d = g.len() / lambda.len().max(1);
    let split = d - d % W;
    let rows = g.chunks_exact(d).zip(y.chunks_exact(d)).zip(g_aux.chunks_exact_mut(d));
    for (((gr, yr), ga), (&lambda, dot)) in rows.zip(lambda.iter().zip(dots.iter_mut())) {
        // `g·y` in W lane sums, the tail into lane 0 (as `vmath::dot`).
        let mut acc = [0.0f32; W];
        for ((gc, yc), ac) in gr[..split].chunks_exact(W).zip(yr[..split].chunks_exact(W)).zip(ga[..split].chunks_exact_mut(W)) {
            for l in 0..W {
                acc[l] = madd::<FMA>(gc[l], yc[l], acc[l]);
                ac[l] = -lambda * gc[l];
            }
        }
        for i in split..d {
            acc[0] = madd::<FMA>(gr[i], yr[i], acc[0]);
            ga[i] = -lambda * gr[i];
        }
        *dot = acc.iter().sum();
    }
}

#[inline(always)]
fn add_rows_body<const FMA: bool, const W: usize>(sum: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(sum.len()) {
        for (sc, rc) in sum.chunks_mut(W).zip(row.chunks(W)) {
            sc.iter_mut().zip(rc).for_each(|(s, r)| *s += r);
        }
    }
}

crate::isa_dispatch!(fn differential_in(x: &[f32], y: &[f32], coefs: &[(f32, f32)], dst: &mut [f32]) = differential_body);
crate::isa_dispatch!(fn differential_grad_in(g: &[f32], y: &[f32], lambda: &[f32], g_aux: &mut [f32], dots: &mut [f32]) = differential_grad_body);
crate::isa_dispatch!(fn add_rows_in(sum: &mut [f32], rows: &[f32]) = add_rows_body);

/// `dst_i = a_i x_i − b_i y_i` for every row `i` of `x`, `y` (`rows x D`, `rows = coefs.len()`, `coefs[i] =
/// (a_i, b_i)`); `dst` holds at least as many rows.
pub fn differential(x: &[f32], y: &[f32], coefs: &[(f32, f32)], dst: &mut [f32]) {
    check(x.len(), coefs.len(), &[y.len()], dst.len());
    differential_in(Isa::current(), x, y, coefs, dst)
}

/// The gradient of [`differential`]'s `−λ_i y_i` term for `g = ∂L/∂dst`: per row `g_aux_i = −λ_i g_i` and
/// `dots[i] = g_i · y_i` (`g`, `y`, `g_aux`: `rows x D`; `lambda`, `dots`: `rows`).
pub fn differential_grad(g: &[f32], y: &[f32], lambda: &[f32], g_aux: &mut [f32], dots: &mut [f32]) {
    check(g.len(), lambda.len(), &[y.len(), g_aux.len()], g.len());
    assert_eq!(dots.len(), lambda.len(), "rows: {} dots for {} rows", dots.len(), lambda.len());
    differential_grad_in(Isa::current(), g, y, lambda, g_aux, dots)
}

/// `sum += Σ_i rows_i` over the rows of `rows` (`n x sum.len()`).
pub fn add_rows(sum: &mut [f32], rows: &[f32]) {
    assert!(!sum.is_empty() && rows.len().is_multiple_of(sum.len()), "rows: {} values are not rows of {}", rows.len(), sum.len());
    add_rows_in(Isa::current(), sum, rows)
}

/// Panics unless `len` holds `rows >= 1` whole rows and every other buffer as many values (`out`: at least as many);
/// a caller bug, not user data.
fn check(len: usize, rows: usize, same: &[usize], out: usize) {
    assert!(rows > 0 && len > 0 && len.is_multiple_of(rows), "rows: {len} values are not {rows} rows");
    assert!(same.iter().all(|&l| l == len) && out >= len, "rows: buffers of {rows} rows disagree");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_matches_naive_loops_on_every_tail() {
        for d in (1..=40).chain([63, 64, 65]) {
            let rows = 3;
            let x: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 23) as f32 - 9.0) * 0.17).collect();
            let y: Vec<f32> = (0..rows * d).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
            let coefs = [(1.5f32, 0.25f32), (0.5, -2.0), (3.0, 0.0)];
            let lambda = [0.3f32, -1.5, 0.0];
            for isa in Isa::supported() {
                let mut dst = vec![f32::NAN; rows * d];
                differential_in(isa, &x, &y, &coefs, &mut dst);
                let (mut g_aux, mut dots) = (vec![f32::NAN; rows * d], vec![f32::NAN; rows]);
                differential_grad_in(isa, &x, &y, &lambda, &mut g_aux, &mut dots);
                let mut sum: Vec<f32> = (0..d).map(|j| j as f32).collect();
                add_rows_in(isa, &mut sum, &x);
                for r in 0..rows {
                    let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
                    let want_dot: f64 = xr.iter().zip(yr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    assert!((dots[r] as f64 - want_dot).abs() <= 1e-5 * (1.0 + want_dot.abs()), "{isa:?} d={d} dot {r}");
                    for i in 0..d {
                        let want = coefs[r].0 as f64 * xr[i] as f64 - coefs[r].1 as f64 * yr[i] as f64;
                        assert!((dst[r * d + i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{isa:?} d={d} [{r}, {i}]");
                        assert_eq!(g_aux[r * d + i], -lambda[r] * xr[i], "{isa:?} d={d} g_aux [{r}, {i}]");
                    }
                }
                for (j, s) in sum.iter().enumerate() {
                    let want = j as f64 + (0..rows).map(|r| x[r * d + j] as f64).sum::<f64>();
                    assert!((*s as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{isa:?} d={d} sum {j}");
                }
            }
        }
    }
}
