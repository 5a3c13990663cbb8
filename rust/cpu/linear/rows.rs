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
    let rows = g.chunks_exact(d).zip(y.chunks_exact(d)).zip(g_aux.chunks_exact_mut(d));
    for (((gr, yr), ga), (&lambda, dot)) in rows.zip(lambda.iter().zip(dots.iter_mut())) {
        *dot = dot_row::<FMA, W>(gr, yr);
        for (ac, gc) in ga.chunks_mut(W).zip(gr.chunks(W)) {
            ac.iter_mut().zip(gc).for_each(|(a, x)| *a = -lambda * x);
        }
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

/// `Σ a_i b_i` of one row in W lane sums, the tail into lane 0 (as `vmath::dot`).
#[inline(always)]
fn dot_row<const FMA: bool, const W: usize>(a: &[f32], b: &[f32]) -> f32 {
    let split = a.len() - a.len() % W;
    let mut acc = [0.0f32; W];
    for (ac, bc) in a[..split].chunks_exact(W).zip(b[..split].chunks_exact(W)) {
        for l in 0..W {
            acc[l] = madd::<FMA>(ac[l], bc[l], acc[l]);
        }
    }
    for (&x, &y) in a[split..].iter().zip(&b[split..]) {
        acc[0] = madd::<FMA>(x, y, acc[0]);
    }
    acc.iter().sum()
}

#[inline(always)]
fn normalize_body<const FMA: bool, const W: usize>(out: &mut [f32], q: &[f32], m: &[f32], eps: f32) {
    let rows = q.len() / m.len();
    let dv = out.len() / rows.max(1);
    for (o, qr) in out.chunks_exact_mut(dv).zip(q.chunks_exact(m.len())) {
        let inv = 1.0 / (dot_row::<FMA, W>(qr, m) + eps);
        for oc in o.chunks_mut(W) {
            oc.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

#[inline(always)]
fn normalize_grad_body<const FMA: bool, const W: usize>(q: &[f32], m: &[f32], eps: f32, t: &mut [f32], g: &mut [f32], dm: &mut [f32]) {
    let (d, rows) = (m.len(), q.len() / m.len());
    let dv = g.len() / rows.max(1);
    for ((qr, tr), gr) in q.chunks_exact(d).zip(t.chunks_exact_mut(d)).zip(g.chunks_exact_mut(dv)) {
        let inv = 1.0 / (dot_row::<FMA, W>(qr, m) + eps);
        let dden = -dot_row::<FMA, W>(qr, tr) * inv * inv;
        for (((tc, mc), dc), qc) in tr.chunks_mut(W).zip(m.chunks(W)).zip(dm.chunks_mut(W)).zip(qr.chunks(W)) {
            for (((x, &mi), a), &qi) in tc.iter_mut().zip(mc).zip(dc).zip(qc) {
                *x = madd::<FMA>(dden, mi, *x * inv);
                *a = madd::<FMA>(dden, qi, *a);
            }
        }
        for gc in gr.chunks_mut(W) {
            gc.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

crate::isa_dispatch!(fn normalize_in(out: &mut [f32], q: &[f32], m: &[f32], eps: f32) = normalize_body);
crate::isa_dispatch!(fn normalize_grad_in(q: &[f32], m: &[f32], eps: f32, t: &mut [f32], g: &mut [f32], dm: &mut [f32]) = normalize_grad_body);
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

/// Linear attention's normalisation of a block of output rows: `out_i /= q_i · m + eps` (`q`: `rows x D` with
/// `D = m.len()`, `out`: `rows x Dv`).
pub fn normalize(out: &mut [f32], q: &[f32], m: &[f32], eps: f32) {
    check(q.len(), q.len() / m.len().max(1), &[], q.len());
    check(out.len(), q.len() / m.len(), &[], out.len());
    normalize_in(Isa::current(), out, q, m, eps)
}

/// The normalisation's backward over a block, from `t = g Sᵀ` (`rows x D`) and the output gradient `g` (`rows x
/// Dv`): with `den_i = q_i · m + eps` and `dden_i = −(q_i · t_i) / den_i²`, `t_i ← t_i / den_i + dden_i m` (then
/// `∂L/∂q_i`), `g_i ← g_i / den_i` and `dm += dden_i q_i`.
pub fn normalize_grad(q: &[f32], m: &[f32], eps: f32, t: &mut [f32], g: &mut [f32], dm: &mut [f32]) {
    let rows = q.len() / m.len().max(1);
    check(q.len(), rows, &[t.len()], q.len());
    check(g.len(), rows, &[], g.len());
    assert_eq!(dm.len(), m.len(), "rows: dm of {} for D = {}", dm.len(), m.len());
    normalize_grad_in(Isa::current(), q, m, eps, t, g, dm)
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
                // Normalisation (out: rows x Dv with Dv = 5) and its backward, against f64 loops.
                let (dv, eps, m) = (5, 0.25f32, &y[..d]);
                let g0: Vec<f32> = (0..rows * dv).map(|i| (i as f32 - 6.0) * 0.3).collect();
                let mut out = g0.clone();
                normalize_in(isa, &mut out, &x, m, eps);
                let (mut t, mut g, mut dm) = (y.clone(), g0.clone(), vec![0.5f32; d]);
                normalize_grad_in(isa, &x, m, eps, &mut t, &mut g, &mut dm);
                let mut want_dm: Vec<f64> = vec![0.5; d];
                for r in 0..rows {
                    let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
                    let den = xr.iter().zip(m).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + eps as f64;
                    let dden = -xr.iter().zip(yr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (den * den);
                    let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs());
                    for i in 0..dv {
                        assert!(close(out[r * dv + i], g0[r * dv + i] as f64 / den), "{isa:?} d={d} out [{r}, {i}]");
                        assert!(close(g[r * dv + i], g0[r * dv + i] as f64 / den), "{isa:?} d={d} g [{r}, {i}]");
                    }
                    for i in 0..d {
                        assert!(close(t[r * d + i], yr[i] as f64 / den + dden * m[i] as f64), "{isa:?} d={d} t [{r}, {i}]");
                        want_dm[i] += dden * xr[i] as f64;
                    }
                }
                for i in 0..d {
                    assert!((dm[i] as f64 - want_dm[i]).abs() <= 1e-4 * (1.0 + want_dm[i].abs()), "{isa:?} d={d} dm {i}");
                }
                for (j, s) in sum.iter().enumerate() {
                    let want = j as f64 + (0..rows).map(|r| x[r * d + j] as f64).sum::<f64>();
                    assert!((*s as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{isa:?} d={d} sum {j}");
                }
            }
        }
    }
}
