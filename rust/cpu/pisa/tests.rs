//! The PISA forward against a naive f64 reading of its definition, and the validation of layouts and selections.

use super::*;
use crate::cpu::test_support::{on_every_isa, values, view};

struct Case {
    n: usize,
    d: usize,
    dv: usize,
    perm: Vec<i64>,
    offsets: Vec<i64>,
    ids: Vec<i64>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// One slice (B = H = 1), N = 150 tokens in reversed order, blocks of 2 (the last of 1: M = 75 > CHUNK), k = 3.
fn case() -> Case {
    let (n, d, dv, b) = (150usize, 5usize, 3usize, 2usize);
    let perm: Vec<i64> = (0..n as i64).rev().collect();
    let mut offsets: Vec<i64> = (0..n).step_by(b).map(|x| x as i64).collect();
    offsets.push(n as i64);
    let m = offsets.len() - 1;
    let ids: Vec<i64> = (0..m).flat_map(|i| [(i * 7) % m, (i * 7 + 1) % m, (i * 7 + 40) % m]).map(|x| x as i64).collect();
    Case { n, d, dv, perm, offsets, ids, q: values(n * d, 1), k: values(n * d, 2), v: values(n * dv, 3) }
}

/// Spec's `num / den` for every token of the single slice, in f64; `hybrid` adds `s Σ_U n_j e^{c_j−m} q·H̄` with
/// `H̄ = (1/N) Σ_j H_j` (each unselected block's moment stood in for by its token count times the mean per token).
fn naive(c: &Case, scale: f64, hybrid: bool) -> Vec<f64> {
    let (d, dv) = (c.d, c.dv);
    let m = c.offsets.len() - 1;
    let block: Vec<Vec<usize>> = (0..m).map(|j| (c.offsets[j]..c.offsets[j + 1]).map(|p| c.perm[p as usize] as usize).collect()).collect();
    let key = |t: usize, i: usize| c.k[t * d + i] as f64;
    let val = |t: usize, i: usize| c.v[t * dv + i] as f64;
    let kmean: Vec<Vec<f64>> = block.iter().map(|ts| (0..d).map(|i| ts.iter().map(|&t| key(t, i)).sum::<f64>() / ts.len() as f64).collect()).collect();
    let vsum: Vec<Vec<f64>> = block.iter().map(|ts| (0..dv).map(|i| ts.iter().map(|&t| val(t, i)).sum::<f64>()).collect()).collect();
    let mut hbar = vec![0.0; d * dv];
    for (j, ts) in block.iter().enumerate() {
        for &t in ts {
            for a in 0..d {
                for e in 0..dv {
                    hbar[a * dv + e] += (key(t, a) - kmean[j][a]) * val(t, e) / c.n as f64;
                }
            }
        }
    }
    let mut out = vec![0.0; c.n * dv];
    for i in 0..m {
        let sel = &c.ids[i * 3..i * 3 + 3];
        for &t in &block[i] {
            let qt: Vec<f64> = (0..d).map(|a| c.q[t * d + a] as f64).collect();
            let dot = |x: &[f64]| scale * qt.iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
            let exact: Vec<(f64, usize)> = sel.iter().flat_map(|&j| block[j as usize].iter().map(|&u| (dot(&(0..d).map(|a| key(u, a)).collect::<Vec<_>>()), u))).collect();
            let others: Vec<usize> = (0..m).filter(|j| !sel.contains(&(*j as i64))).collect();
            let cent: Vec<f64> = others.iter().map(|&j| dot(&kmean[j])).collect();
            let mx = exact.iter().map(|e| e.0).chain(cent.iter().copied()).fold(f64::NEG_INFINITY, f64::max);
            let (mut den, mut num, mut z) = (0.0, vec![0.0; dv], 0.0);
            for &(l, u) in &exact {
                den += (l - mx).exp();
                (0..dv).for_each(|e| num[e] += (l - mx).exp() * val(u, e));
            }
            for (&j, &cj) in others.iter().zip(&cent) {
                let w = (cj - mx).exp();
                den += block[j].len() as f64 * w;
                z += block[j].len() as f64 * w;
                (0..dv).for_each(|e| num[e] += w * vsum[j][e]);
            }
            for e in 0..dv {
                let first = if hybrid { scale * z * (0..d).map(|a| qt[a] * hbar[a * dv + e]).sum::<f64>() } else { 0.0 };
                out[t * dv + e] = (num[e] + first) / den;
            }
        }
    }
    out
}

/// Centroids and `H̄ = (1/N) Σ_j H_j` in f32, by direct loops.
fn centroids(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, dv) = (c.d, c.dv);
    let m = c.offsets.len() - 1;
    let (mut km, mut vm) = (vec![0.0f32; m * d], vec![0.0f32; m * dv]);
    let mut hbar = vec![0.0f32; d * dv];
    for j in 0..m {
        let ts: Vec<usize> = (c.offsets[j]..c.offsets[j + 1]).map(|p| c.perm[p as usize] as usize).collect();
        let len = ts.len() as f32;
        for &t in &ts {
            (0..d).for_each(|a| km[j * d + a] += c.k[t * d + a] / len);
            (0..dv).for_each(|e| vm[j * dv + e] += c.v[t * dv + e] / len);
        }
        for &t in &ts {
            for a in 0..d {
                for e in 0..dv {
                    hbar[a * dv + e] += (c.k[t * d + a] - km[j * d + a]) * c.v[t * dv + e] / c.n as f32;
                }
            }
        }
    }
    (km, vm, hbar)
}

#[test]
fn forward_matches_naive_spec() {
    on_every_isa(|| {
        let c = case();
        let (n, d, dv) = (c.n, c.d, c.dv);
        let m = c.offsets.len() - 1;
        let (km, vm, hbar) = centroids(&c);
        let layout = Layout::new(&c.perm, &c.offsets, n).unwrap();
        let selection = Selection::new(&c.ids, 1, m).unwrap();
        let (q, k, v) = (view("q", &c.q, &[1, 1, n, d]), view("k", &c.k, &[1, 1, n, d]), view("v", &c.v, &[1, 1, n, dv]));
        let (kmv, vmv, hv) = (view("key_mean", &km, &[1, 1, m, d]), view("value_mean", &vm, &[1, 1, m, dv]), view("moment_mean", &hbar, &[1, 1, d, dv]));
        let x = Inputs { q: &q, k: &k, v: &v, key_mean: &kmv, value_mean: &vmv, layout: &layout, selection: &selection, scale: 0.7 };
        for hybrid in [false, true] {
            let (out, lse, zeta) = (vec![f32::NAN; n * dv], vec![f32::NAN; n], vec![f32::NAN; n]);
            let (ov, lv, zv) = (view("out", &out, &[1, 1, n, dv]), view("lse", &lse, &[1, 1, n]), view("zeta", &zeta, &[1, 1, n]));
            forward(&x, hybrid.then_some(&hv), &ov, &lv, &zv, 2).unwrap();
            let want = naive(&c, 0.7, hybrid);
            for (got, want) in out.iter().zip(&want) {
                assert!((*got as f64 - want).abs() < 2e-5, "hybrid={hybrid}: {got} vs {want}");
            }
            assert!(lse.iter().chain(&zeta).all(|x| x.is_finite()));
        }
    });
}

#[test]
fn bad_layouts_and_selections_are_errors() {
    assert!(Layout::new(&[0, 0, 1], &[0, 3], 3).is_err());
    assert!(Layout::new(&[0, 1, 2], &[0, 2, 2, 3], 3).is_err()); // empty block
    assert!(Layout::new(&[0, 1, 2], &[0, 4], 3).is_err());
    assert!(Layout::new(&[0, 1, 5], &[0, 3], 3).is_err());
    assert!(Selection::new(&[0, 1, 1, 0], 1, 2).is_ok());
    assert!(Selection::new(&[0, 0, 1, 0], 1, 2).is_err()); // repeated id
    assert!(Selection::new(&[0, 2], 1, 2).is_err()); // out of range
    assert!(Selection::new(&[0, 1, 1], 1, 2).is_err()); // not (M, k)
    assert!(Selection::new(&[-1, 1], 1, 2).is_err());
}

#[test]
fn stats_match_direct_loops() {
    on_every_isa(|| {
        let c = case();
        let (n, d, dv) = (c.n, c.d, c.dv);
        let m = c.offsets.len() - 1;
        let (km, vm, hbar) = centroids(&c);
        let layout = Layout::new(&c.perm, &c.offsets, n).unwrap();
        let (k, v, q) = (view("k", &c.k, &[1, 1, n, d]), view("v", &c.v, &[1, 1, n, dv]), view("q", &c.q, &[1, 1, n, d]));
        let out = |len: usize| vec![f32::NAN; len];
        // The centred spread ‖H_j − (1/M) Σ_i H_i‖_F: the centre is H̄ times N / M.
        let centre = n as f32 / m as f32;
        let (okm, ovm, ohm, oqm, okv, osp) = (out(m * d), out(m * dv), out(d * dv), out(m * d), out(m), out(m));
        let outs = StatsOutputs {
            key_mean: &view("key_mean", &okm, &[1, 1, m, d]),
            value_mean: &view("value_mean", &ovm, &[1, 1, m, dv]),
            moment_mean: Some(&view("moment_mean", &ohm, &[1, 1, d, dv])),
            query_mean: Some(&view("query_mean", &oqm, &[1, 1, m, d])),
            key_variance: Some(&view("key_variance", &okv, &[1, 1, m])),
            spread: Some((&view("spread", &osp, &[1, 1, m]), centre)),
        };
        stats(&k, &v, Some(&q), &layout, &outs, 3).unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()));
        assert!(close(&okm, &km) && close(&ovm, &vm) && close(&ohm, &hbar));
        for j in 0..m {
            let ts: Vec<usize> = (c.offsets[j]..c.offsets[j + 1]).map(|p| c.perm[p as usize] as usize).collect();
            let var: f32 = ts.iter().map(|&t| (0..d).map(|a| (c.k[t * d + a] - km[j * d + a]).powi(2)).sum::<f32>()).sum::<f32>() / ts.len() as f32;
            assert!((okv[j] - var).abs() < 1e-5 * (1.0 + var), "key variance {} vs {var}", okv[j]);
        }
        for j in 0..m {
            let ts: Vec<usize> = (c.offsets[j]..c.offsets[j + 1]).map(|p| c.perm[p as usize] as usize).collect();
            for a in 0..d {
                let want = ts.iter().map(|&t| c.q[t * d + a]).sum::<f32>() / ts.len() as f32;
                assert!((oqm[j * d + a] - want).abs() < 1e-5);
            }
            let mut sq = 0.0f32;
            for a in 0..d {
                for e in 0..dv {
                    let hj: f32 = ts.iter().map(|&t| (c.k[t * d + a] - km[j * d + a]) * c.v[t * dv + e]).sum();
                    sq += (hj - centre * hbar[a * dv + e]).powi(2);
                }
            }
            assert!((osp[j] - sq.sqrt()).abs() < 1e-4 * (1.0 + sq.sqrt()), "{} vs {}", osp[j], sq.sqrt());
        }
    });
}
