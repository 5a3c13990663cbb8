//! The linear core against naive f64 loops, DyDiLA's backward against finite differences, and the checks.

use super::*;
use crate::cpu::test_support::{on_every_isa, values, view, view_of};

/// `O = Q S`, `S = (1/Nk) Σ kᵀ v` per head in f64 (`/ (q·mean k + eps)` when normalising); row-major inputs of
/// `n` queries and `nk` keys.
#[allow(clippy::too_many_arguments)]
fn naive_linear(q: &[f64], k: &[f64], v: &[f64], bh: usize, [n, nk]: [usize; 2], d: usize, dv: usize, normalize: bool, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; bh * n * dv];
    for h in 0..bh {
        let (q, k, v) = (&q[h * n * d..], &k[h * nk * d..], &v[h * nk * dv..]);
        let mut s = vec![0.0; d * dv];
        let mut m = vec![0.0; d];
        for t in 0..nk {
            for i in 0..d {
                m[i] += k[t * d + i] / nk as f64;
                for j in 0..dv {
                    s[i * dv + j] += k[t * d + i] * v[t * dv + j] / nk as f64;
                }
            }
        }
        for t in 0..n {
            let den = if normalize { (0..d).map(|i| q[t * d + i] * m[i]).sum::<f64>() + eps } else { 1.0 };
            for j in 0..dv {
                out[(h * n + t) * dv + j] = (0..d).map(|i| q[t * d + i] * s[i * dv + j]).sum::<f64>() / den;
            }
        }
    }
    out
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-12f64, |a, b| a.max(b.abs()));
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn linear_forward_and_backward_match_naive_loops_across_splits() {
    on_every_isa(|| {
        // N = 2100 gives 3 token splits with 3 threads, a ragged last block, and odd head dims.
        let (b, h, n, d, dv) = (1, 2, 2100, 7, 5);
        let (qd, kd, vd) = (values(b * h * n * d, 1), values(b * h * n * d, 2), values(b * h * n * dv, 3));
        let (qd, kd): (Vec<f32>, Vec<f32>) = (qd.iter().map(|x| x.abs() + 0.1).collect(), kd.iter().map(|x| x.abs() + 0.1).collect());
        for normalize in [false, true] {
            let opts = Options { normalize, eps: 1e-6 };
            let (q, k, v) = (view("q", &qd, &[b, h, n, d]), view("k", &kd, &[b, h, n, d]), view("v", &vd, &[b, h, n, dv]));
            let (od, sd, md) = (vec![f32::NAN; b * h * n * dv], vec![f32::NAN; b * h * d * dv], vec![f32::NAN; b * h * d]);
            let (out, state, ksum) = (view("out", &od, &[b, h, n, dv]), view("state", &sd, &[b, h, d, dv]), view("ksum", &md, &[b, h, d]));
            assert_eq!(Dims { batch: b, heads: h, n, d, dv }.splits(3), 3);
            linear_forward(&q, &k, &v, &out, &state, &ksum, opts, 3).unwrap();
            let want = naive_linear(&to_f64(&qd), &to_f64(&kd), &to_f64(&vd), b * h, [n, n], d, dv, normalize, 1e-6);
            assert!(max_rel_err(&od, &want) < 1e-5, "forward normalize={normalize}");

            // Backward of L = Σ G ⊙ O by central differences on a few entries of every input.
            let gd = values(b * h * n * dv, 4);
            let (dqd, dkd, dvd) = (vec![f32::NAN; qd.len()], vec![f32::NAN; kd.len()], vec![f32::NAN; vd.len()]);
            let (dq, dk, dvv) = (view("dq", &dqd, &[b, h, n, d]), view("dk", &dkd, &[b, h, n, d]), view("dv", &dvd, &[b, h, n, dv]));
            let dout = view("dout", &gd, &[b, h, n, dv]);
            linear_backward(&q, &k, &v, &state, &ksum, &dout, [&dq, &dk, &dvv], opts, 3).unwrap();
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                naive_linear(q, k, v, b * h, [n, n], d, dv, normalize, 1e-6).iter().zip(&gd).map(|(o, g)| o * *g as f64).sum()
            };
            let base = [to_f64(&qd), to_f64(&kd), to_f64(&vd)];
            for (which, got) in [&dqd, &dkd, &dvd].into_iter().enumerate() {
                for idx in [0, 1, got.len() / 2 + 3, got.len() - 1] {
                    let mut plus = base.clone();
                    let mut minus = base.clone();
                    plus[which][idx] += 1e-4;
                    minus[which][idx] -= 1e-4;
                    let fd = (loss(&plus[0], &plus[1], &plus[2]) - loss(&minus[0], &minus[1], &minus[2])) / 2e-4;
                    assert!((got[idx] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "grad {which}[{idx}]: {} vs {fd}", got[idx]);
                }
            }
        }
    });
}

#[test]
fn cross_attention_forward_and_backward_match_naive_loops() {
    on_every_isa(|| {
        // 700 queries, 2300 keys (3 key splits with 3 threads) and the reverse: the state is a mean over the keys.
        let (b, h, d, dv) = (1, 2, 5, 3);
        for [n, nk] in [[700, 2300], [2300, 700]] {
            let (qd, kd, vd) = (values(b * h * n * d, 5), values(b * h * nk * d, 6), values(b * h * nk * dv, 7));
            let (qd, kd): (Vec<f32>, Vec<f32>) = (qd.iter().map(|x| x.abs() + 0.1).collect(), kd.iter().map(|x| x.abs() + 0.1).collect());
            let opts = Options { normalize: true, eps: 1e-6 };
            let (q, k, v) = (view("q", &qd, &[b, h, n, d]), view("k", &kd, &[b, h, nk, d]), view("v", &vd, &[b, h, nk, dv]));
            let (od, sd, md) = (vec![f32::NAN; b * h * n * dv], vec![f32::NAN; b * h * d * dv], vec![f32::NAN; b * h * d]);
            let (out, state, ksum) = (view("out", &od, &[b, h, n, dv]), view("state", &sd, &[b, h, d, dv]), view("ksum", &md, &[b, h, d]));
            linear_forward(&q, &k, &v, &out, &state, &ksum, opts, 3).unwrap();
            let want = naive_linear(&to_f64(&qd), &to_f64(&kd), &to_f64(&vd), b * h, [n, nk], d, dv, true, 1e-6);
            assert!(max_rel_err(&od, &want) < 1e-5, "forward {n} x {nk}");

            let gd = values(b * h * n * dv, 8);
            let (dqd, dkd, dvd) = (vec![f32::NAN; qd.len()], vec![f32::NAN; kd.len()], vec![f32::NAN; vd.len()]);
            let (dq, dk, dvv) = (view("dq", &dqd, &[b, h, n, d]), view("dk", &dkd, &[b, h, nk, d]), view("dv", &dvd, &[b, h, nk, dv]));
            linear_backward(&q, &k, &v, &state, &ksum, &view("dout", &gd, &[b, h, n, dv]), [&dq, &dk, &dvv], opts, 3).unwrap();
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                naive_linear(q, k, v, b * h, [n, nk], d, dv, true, 1e-6).iter().zip(&gd).map(|(o, g)| o * *g as f64).sum()
            };
            let base = [to_f64(&qd), to_f64(&kd), to_f64(&vd)];
            for (which, got) in [&dqd, &dkd, &dvd].into_iter().enumerate() {
                for idx in [0, got.len() / 2 + 3, got.len() - 1] {
                    let (mut plus, mut minus) = (base.clone(), base.clone());
                    plus[which][idx] += 1e-4;
                    minus[which][idx] -= 1e-4;
                    let fd = (loss(&plus[0], &plus[1], &plus[2]) - loss(&minus[0], &minus[1], &minus[2])) / 2e-4;
                    assert!((got[idx] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "{n} x {nk}: grad {which}[{idx}]: {} vs {fd}", got[idx]);
                }
            }
        }
    });
}

/// DyDiLA in f64 from its definitions: `(B·H, N, ·)` row-major inputs, per-token `(B·H, N)` parameters.
struct Case {
    bh: usize,
    n: usize,
    d: usize,
    dv: usize,
    /// q, k, v, q_aux, k_aux, then γq, γk, γq_aux, γk_aux, λq, λk.
    inputs: Vec<Vec<f64>>,
}

impl Case {
    fn phi(z: &[f64], gamma: f64) -> Vec<f64> {
        let r: Vec<f64> = z.iter().map(|x| x.max(0.0) + 1e-6).collect();
        let p: Vec<f64> = r.iter().map(|x| x.powf(gamma)).collect();
        let n1 = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        let n2 = p.iter().map(|x| x * x).sum::<f64>().sqrt();
        p.iter().map(|x| n1 * x / n2).collect()
    }

    fn features(&self, x: &[Vec<f64>], main: usize, aux: usize, gamma: usize, gamma_aux: usize, lambda: usize) -> Vec<f64> {
        let d = self.d;
        let mut out = Vec::with_capacity(self.bh * self.n * d);
        for t in 0..self.bh * self.n {
            let a = Self::phi(&x[main][t * d..(t + 1) * d], x[gamma][t]);
            let b = Self::phi(&x[aux][t * d..(t + 1) * d], x[gamma_aux][t]);
            out.extend(a.iter().zip(&b).map(|(a, b)| a - x[lambda][t] * b));
        }
        out
    }

    fn output(&self, x: &[Vec<f64>], normalize: bool) -> Vec<f64> {
        let q_hat = self.features(x, 0, 3, 5, 7, 9);
        let k_hat = self.features(x, 1, 4, 6, 8, 10);
        naive_linear(&q_hat, &k_hat, &x[2], self.bh, [self.n, self.n], self.d, self.dv, normalize, 1e-6)
    }
}

#[test]
fn dydila_forward_and_every_gradient_match_the_definition() {
    on_every_isa(|| {
        let (bh, n, d, dv) = (2, 5, 6, 3);
        let mut inputs: Vec<Vec<f64>> = Vec::new();
        for i in 0..5 {
            let len = if i == 2 { bh * n * dv } else { bh * n * d };
            // Away from relu's kink, so finite differences are smooth.
            inputs.push(to_f64(&values(len, 10 + i as u64)).iter().map(|x| if x.abs() < 0.05 { x + 0.1 } else { *x } + 0.3).collect());
        }
        for i in 0..6 {
            let (lo, hi) = if i < 4 { (1.0, 4.0) } else { (0.0, 0.5) };
            inputs.push(to_f64(&values(bh * n, 20 + i as u64)).iter().map(|x| lo + (hi - lo) * (x + 1.5) / 3.0).collect());
        }
        let case = Case { bh, n, d, dv, inputs };
        let data: Vec<Vec<f32>> = case.inputs.iter().map(|x| x.iter().map(|&v| v as f32).collect()).collect();
        let big = [1, bh, n, d];
        let tok = [1, bh, n];
        let names = ["q", "k", "v", "q_aux", "k_aux", "gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k"];
        let views: Vec<View> = (0..11)
            .map(|i| {
                let shape: &[usize] = if i == 2 { &[1, bh, n, dv] } else if i < 5 { &big } else { &tok };
                view(names[i], &data[i], shape)
            })
            .collect();
        let x = DydilaInputs {
            q: Stream { z: &views[0], z_aux: &views[3], gamma: &views[5], gamma_aux: &views[7], lambda: &views[9] },
            k: Stream { z: &views[1], z_aux: &views[4], gamma: &views[6], gamma_aux: &views[8], lambda: &views[10] },
            v: &views[2],
        };
        let gd = values(bh * n * dv, 30);
        for normalize in [false, true] {
            let opts = Options { normalize, eps: 1e-6 };
            let (od, sd, md) = (vec![f32::NAN; bh * n * dv], vec![f32::NAN; bh * d * dv], vec![f32::NAN; bh * d]);
            let (out, state, ksum) = (view("out", &od, &[1, bh, n, dv]), view("state", &sd, &[1, bh, d, dv]), view("ksum", &md, &[1, bh, d]));
            dydila_forward(&x, &out, &state, &ksum, opts, 2).unwrap();
            assert!(max_rel_err(&od, &case.output(&case.inputs, normalize)) < 2e-5, "forward normalize={normalize}");

            let grads: Vec<Vec<f32>> = data.iter().map(|x| vec![f32::NAN; x.len()]).collect();
            let gviews: Vec<View> = (0..11)
                .map(|i| {
                    let shape: &[usize] = if i == 2 { &[1, bh, n, dv] } else if i < 5 { &big } else { &tok };
                    view(names[i], &grads[i], shape)
                })
                .collect();
            let g = DydilaGrads {
                q: StreamGrads { dz: &gviews[0], dz_aux: &gviews[3], dgamma: &gviews[5], dgamma_aux: &gviews[7], dlambda: &gviews[9] },
                k: StreamGrads { dz: &gviews[1], dz_aux: &gviews[4], dgamma: &gviews[6], dgamma_aux: &gviews[8], dlambda: &gviews[10] },
                dv: &gviews[2],
            };
            let dout = view("dout", &gd, &[1, bh, n, dv]);
            dydila_backward(&x, &state, &ksum, &dout, g, opts, 2).unwrap();
            let loss = |x: &[Vec<f64>]| -> f64 { case.output(x, normalize).iter().zip(&gd).map(|(o, g)| o * *g as f64).sum() };
            for (which, got) in grads.iter().enumerate() {
                for idx in 0..got.len() {
                    let (mut plus, mut minus) = (case.inputs.clone(), case.inputs.clone());
                    plus[which][idx] += 1e-5;
                    minus[which][idx] -= 1e-5;
                    let fd = (loss(&plus) - loss(&minus)) / 2e-5;
                    let tol = 2e-3 * (1.0 + fd.abs());
                    assert!((got[idx] as f64 - fd).abs() < tol, "normalize={normalize} {}[{idx}]: {} vs {fd}", names[which], got[idx]);
                }
            }
        }
    });
}

#[test]
fn bad_descriptors_are_errors() {
    let (n, d) = (4, 3);
    let a = values(n * d, 1);
    let o = vec![0.0f32; n * d];
    let s = vec![0.0f32; d * d];
    let m = vec![0.0f32; d];
    let q = view("q", &a, &[1, 1, n, d]);
    let (out, state, ksum) = (view("out", &o, &[1, 1, n, d]), view("state", &s, &[1, 1, d, d]), view("ksum", &m, &[1, 1, d]));
    let opts = Options { normalize: true, eps: 1e-6 };
    assert!(linear_forward(&q, &q, &q, &out, &state, &ksum, opts, 1).is_ok());
    let short = view("k", &a[..(n - 1) * d], &[1, 1, n - 1, d]);
    assert!(linear_forward(&q, &short, &q, &out, &state, &ksum, opts, 1).unwrap_err().0.contains("shapes disagree"));
    let strided = View::new("out", o.as_ptr() as usize, "float32", vec![1, 1, n, d], vec![0, 0, 1, 4]).unwrap();
    assert!(linear_forward(&q, &q, &q, &strided, &state, &ksum, opts, 1).unwrap_err().0.contains("contiguous"));
    let wrong_state = view("state", &s[..d * 2], &[1, 1, d, 2]);
    assert!(linear_forward(&q, &q, &q, &out, &wrong_state, &ksum, opts, 1).unwrap_err().0.contains("state"));
    let bad_eps = Options { normalize: true, eps: 0.0 };
    assert!(linear_forward(&q, &q, &q, &out, &state, &ksum, bad_eps, 1).unwrap_err().0.contains("eps"));
    let ints = view_of("k", &a, "int32", &[1, 1, n, d]);
    assert!(linear_forward(&q, &ints, &q, &out, &state, &ksum, opts, 1).is_err());
    let empty = view("q", &a, &[1, 1, 0, d]);
    assert!(linear_forward(&empty, &empty, &empty, &out, &state, &ksum, opts, 1).is_err());
}
