//! The disc kernels against a naive f64 loop over every (query, key) pair of CLEAR's mask: forward (out, lse) and
//! backward (dq, dk, dv, global tokens' gradients), over grids with text on either side, frames, global tokens and
//! tails of every size, at 1 and 3 threads (one part per slice, and slices split into parts).

use super::*;
use crate::cpu::test_support::{close, on_every_isa, values, view, Naive};

fn allowed(g: &Geometry, q: usize, k: usize) -> bool {
    let image = |i: usize| -> Option<(i64, i64, i64)> {
        let start = if g.text_first { g.text } else { 0 };
        (i >= start && i < start + g.image()).then(|| {
            let r = i - start;
            ((r / (g.height * g.width)) as i64, ((r / g.width) % g.height) as i64, (r % g.width) as i64)
        })
    };
    if k >= g.tokens() {
        return image(q).is_some();
    }
    match (image(q), image(k)) {
        (Some((t0, y0, x0)), Some((t1, y1, x1))) => {
            (t0 - t1).abs() <= g.max_dt && (y0 - y1).pow(2) + (x0 - x1).pow(2) <= g.max_d2
        }
        _ => true,
    }
}

/// One slice: q (N, d), keys (NK, d) and values (NK, dv) with the global tokens appended, dout (N, dv).
fn naive(g: &Geometry, q: &[f32], k: &[f32], v: &[f32], dout: &[f32], d: usize, dv: usize, scale: f64) -> Naive {
    let (n, nk) = (g.tokens(), g.keys());
    let mut r = Naive { out: vec![0.0; n * dv], lse: vec![0.0; n], dq: vec![0.0; n * d], dk: vec![0.0; nk * d], dv: vec![0.0; nk * dv] };
    for i in 0..n {
        let keys: Vec<usize> = (0..nk).filter(|&j| allowed(g, i, j)).collect();
        let s: Vec<f64> = keys.iter().map(|&j| (0..d).map(|c| q[i * d + c] as f64 * k[j * d + c] as f64).sum::<f64>() * scale).collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        r.lse[i] = m + z.ln();
        let p: Vec<f64> = s.iter().map(|x| (x - r.lse[i]).exp()).collect();
        for (pj, &j) in p.iter().zip(&keys) {
            for c in 0..dv {
                r.out[i * dv + c] += pj * v[j * dv + c] as f64;
            }
        }
        let delta: f64 = (0..dv).map(|c| dout[i * dv + c] as f64 * r.out[i * dv + c]).sum();
        for (pj, &j) in p.iter().zip(&keys) {
            let dp: f64 = (0..dv).map(|c| dout[i * dv + c] as f64 * v[j * dv + c] as f64).sum();
            let ds = pj * (dp - delta);
            for c in 0..d {
                r.dq[i * d + c] += ds * k[j * d + c] as f64 * scale;
                r.dk[j * d + c] += ds * q[i * d + c] as f64 * scale;
            }
            for c in 0..dv {
                r.dv[j * dv + c] += pj * dout[i * dv + c] as f64;
            }
        }
    }
    r
}

fn run(g: Geometry, heads: usize, d: usize, dv: usize, threads: usize) {
    let (n, gl) = (g.tokens(), g.global);
    let scale = 0.3f32;
    let (q, k, v) = (values(heads * n * d, 1), values(heads * n * d, 2), values(heads * n * dv, 3));
    let (kg, vg) = (values(heads * gl * d, 4), values(heads * gl * dv, 5));
    let dout = values(heads * n * dv, 6);
    let (qv, kv, vv) = (view("q", &q, &[1, heads, n, d]), view("k", &k, &[1, heads, n, d]), view("v", &v, &[1, heads, n, dv]));
    let (kgv, vgv) = (view("kg", &kg, &[1, heads, gl, d]), view("vg", &vg, &[1, heads, gl, dv]));
    let inp = Inputs { q: &qv, k: &kv, v: &vv, global: (gl > 0).then_some((&kgv, &vgv)) };
    let (out, lse) = (vec![0.0f32; heads * n * dv], vec![0.0f32; heads * n]);
    let (outv, lsev) = (view("out", &out, &[1, heads, n, dv]), view("lse", &lse, &[1, heads, n]));
    forward(&inp, &outv, &lsev, &g, scale, threads).unwrap();
    let mut delta = vec![0.0f32; heads * n];
    for (i, x) in delta.iter_mut().enumerate() {
        *x = (0..dv).map(|c| dout[i * dv + c] * out[i * dv + c]).sum();
    }
    let (dq, dk, dvb) = (vec![0.0f32; heads * n * d], vec![0.0f32; heads * n * d], vec![0.0f32; heads * n * dv]);
    let (dkg, dvg) = (vec![0.0f32; heads * gl * d], vec![0.0f32; heads * gl * dv]);
    let (doutv, deltav) = (view("dout", &dout, &[1, heads, n, dv]), view("delta", &delta, &[1, heads, n]));
    let (dqv, dkv, dvv) = (view("dq", &dq, &[1, heads, n, d]), view("dk", &dk, &[1, heads, n, d]), view("dv", &dvb, &[1, heads, n, dv]));
    let (dkgv, dvgv) = (view("dkg", &dkg, &[1, heads, gl, d]), view("dvg", &dvg, &[1, heads, gl, dv]));
    let up = Upstream { dout: &doutv, lse: &lsev, delta: &deltav };
    let grads = Grads { dq: &dqv, dk: &dkv, dv: &dvv, global: (gl > 0).then_some((&dkgv, &dvgv)) };
    backward(&inp, &up, &grads, &g, scale, threads).unwrap();
    for h in 0..heads {
        let cat = |a: &[f32], b: &[f32], w: usize| [&a[h * n * w..(h + 1) * n * w], &b[h * gl * w..(h + 1) * gl * w]].concat();
        let r = naive(&g, &q[h * n * d..(h + 1) * n * d], &cat(&k, &kg, d), &cat(&v, &vg, dv), &dout[h * n * dv..(h + 1) * n * dv], d, dv, scale as f64);
        let tag = format!("{g:?} h{h} t{threads}");
        close(&format!("out {tag}"), &out[h * n * dv..(h + 1) * n * dv], &r.out, 2e-5);
        close(&format!("lse {tag}"), &lse[h * n..(h + 1) * n], &r.lse, 2e-5);
        close(&format!("dq {tag}"), &dq[h * n * d..(h + 1) * n * d], &r.dq, 2e-5);
        close(&format!("dk {tag}"), &dk[h * n * d..(h + 1) * n * d], &r.dk[..n * d], 2e-5);
        close(&format!("dv {tag}"), &dvb[h * n * dv..(h + 1) * n * dv], &r.dv[..n * dv], 2e-5);
        close(&format!("dkg {tag}"), &dkg[h * gl * d..(h + 1) * gl * d], &r.dk[n * d..], 2e-5);
        close(&format!("dvg {tag}"), &dvg[h * gl * dv..(h + 1) * gl * dv], &r.dv[n * dv..], 2e-5);
    }
}

fn geo(frames: usize, height: usize, width: usize, text: usize, text_first: bool, global: usize, max_d2: i64, max_dt: i64) -> Geometry {
    Geometry { frames, height, width, text, text_first, global, max_d2, max_dt }
}

#[test]
fn matches_naive_loop_on_images() {
    on_every_isa(|| {
        for threads in [1, 3] {
            run(geo(1, 7, 9, 0, true, 0, 6, 0), 2, 13, 11, threads);
            run(geo(1, 11, 6, 5, true, 0, 8, 0), 1, 16, 16, threads);
            run(geo(1, 5, 13, 9, false, 3, 3, 0), 2, 8, 5, threads);
            run(geo(1, 3, 3, 0, true, 0, 0, 0), 1, 4, 4, threads);
        }
    });
}

#[test]
fn matches_naive_loop_on_videos_and_large_radii() {
    on_every_isa(|| {
        for threads in [1, 3] {
            run(geo(3, 5, 6, 4, false, 2, 4, 1), 2, 9, 7, threads);
            run(geo(2, 4, 5, 70, true, 0, 1000, 5), 1, 8, 8, threads);
        }
    });
}

#[test]
fn matches_naive_loop_when_rows_are_wider_than_a_piece() {
    on_every_isa(|| {
        // Image rows of 300 keys are split into pieces of at most 256; text queries fold several batches.
        run(geo(1, 2, 300, 3, true, 1, 100_000, 0), 1, 8, 8, 2);
        run(geo(1, 3, 270, 0, false, 0, 2, 0), 1, 8, 8, 1);
    });
}

#[test]
fn rejects_mismatched_shapes() {
    let g = geo(1, 4, 4, 0, true, 0, 4, 0);
    let x = values(16 * 8, 1);
    let (q, short) = (view("q", &x, &[1, 1, 16, 8]), view("k", &x[..15 * 8], &[1, 1, 15, 8]));
    let out = vec![0.0f32; 16 * 8];
    let lse = vec![0.0f32; 16];
    let (outv, lsev) = (view("out", &out, &[1, 1, 16, 8]), view("lse", &lse, &[1, 1, 16]));
    let inp = Inputs { q: &q, k: &short, v: &q, global: None };
    let e = forward(&inp, &outv, &lsev, &g, 1.0, 1).unwrap_err();
    assert!(e.0.contains("k: expected shape"), "{}", e.0);
    let g2 = geo(1, 4, 4, 0, true, 2, 4, 0);
    let inp = Inputs { q: &q, k: &q, v: &q, global: None };
    assert!(forward(&inp, &outv, &lsev, &g2, 1.0, 1).unwrap_err().0.contains("global"));
}

