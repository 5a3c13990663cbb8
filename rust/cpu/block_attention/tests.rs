//! The block engine against a naive f64 loop over the pairs its plan allows: forward (out, lse) and backward (dq,
//! dk, dv), with full and masked entries, ragged blocks, query blocks whose keys span several panels (the online
//! softmax rescales) or none at all, a key-valid mask, the disc mask or none, odd head dims, strided keys, and 1 and
//! 3 threads (the one-pass and the two-pass backward).

use super::*;
use crate::cpu::test_support::{close, on_every_isa, values, view, view_mut, Naive};

const BATCH: usize = 2;
const HEADS: usize = 2;
const D: usize = 13;
const DV: usize = 11;
const SCALE: f32 = 0.35;
/// Text tokens, then two frames of 12 x 12 image tokens; the keys add 3 extra (global) tokens.
const TEXT: usize = 10;
const FRAMES: usize = 2;
const SIDE: usize = 12;
const EXTRA: usize = 3;
// With B·H = 4 slices, 1 thread takes the one-pass backward and 3 threads the two-pass one.
const _: () = assert!(BATCH * HEADS >= SLICES_PER_THREAD && BATCH * HEADS < 3 * SLICES_PER_THREAD);

/// Deterministic pseudo-random integers.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % bound
    }
}

/// A plan in the arrays `BlockPlan::from_arrays` takes, the key validity, and the per-position views of it the
/// naive loop needs.
struct Case {
    nq: usize,
    nk: usize,
    q_perm: Vec<i64>,
    q_offsets: Vec<i64>,
    k_perm: Vec<i64>,
    k_offsets: Vec<i64>,
    indptr: Vec<i64>,
    indices: Vec<i64>,
    kinds: Vec<i32>,
    q_coords: Vec<i32>,
    k_coords: Vec<i32>,
    /// `(B, Nk)` in key layout order.
    key_valid: Vec<i32>,
}

/// `(t, y, x)` of token `i` (text `-1`, extra keys `-2`).
fn coords(i: usize) -> [i32; 3] {
    let image = FRAMES * SIDE * SIDE;
    if i < TEXT {
        [-1; 3]
    } else if i < TEXT + image {
        let r = i - TEXT;
        [(r / (SIDE * SIDE)) as i32, ((r / SIDE) % SIDE) as i32, (r % SIDE) as i32]
    } else {
        [-2; 3]
    }
}

/// Block boundaries from cycling through `sizes` until `n`.
fn offsets(n: usize, sizes: &[usize]) -> Vec<i64> {
    let mut out = vec![0i64];
    for &s in sizes.iter().cycle() {
        let last = *out.last().unwrap() as usize;
        if last == n {
            return out;
        }
        out.push((last + s).min(n) as i64);
    }
    unreachable!()
}

/// A permutation of `0..n`: `i -> (i·step + shift) mod n` (`step` coprime with `n`).
fn shuffled(n: usize, step: usize, shift: usize) -> Vec<i64> {
    (0..n).map(|i| ((i * step + shift) % n) as i64).collect()
}

fn case() -> Case {
    let nq = TEXT + FRAMES * SIDE * SIDE;
    let nk = nq + EXTRA;
    // Ragged blocks: single tokens, small and large ones. Key blocks 37 + 5 + 64 + 1 + 90 + 23 + 41 > 256, so a
    // query block listing most of them needs two or three panels.
    let q_offsets = offsets(nq, &[7, 13, 1, 20, 16, 9, 33, 2]);
    let k_offsets = offsets(nk, &[37, 5, 64, 1, 90, 23, 41, 17, 3]);
    let (mq, mk) = (q_offsets.len() - 1, k_offsets.len() - 1);
    let mut rng = Lcg(7);
    let (mut indptr, mut indices, mut kinds) = (vec![0i64], Vec::new(), Vec::new());
    for i in 0..mq {
        for j in 0..mk {
            // Query block 3 lists nothing (its queries have no key); blocks 0 and 5 list every key block.
            let listed = i != 3 && (i % 5 == 0 || rng.below(3) > 0);
            if listed {
                indices.push(j as i64);
                kinds.push((rng.below(3) > 0) as i32); // two in three masked
            }
        }
        indptr.push(indices.len() as i64);
    }
    let q_perm = shuffled(nq, 7, 3);
    let k_perm = shuffled(nk, 11, 5);
    let q_coords = q_perm.iter().flat_map(|&t| coords(t as usize)).collect();
    let k_coords = k_perm.iter().flat_map(|&t| coords(t as usize)).collect();
    let key_valid = (0..BATCH * nk).map(|x| ((x * 13) % 7 != 0) as i32).collect();
    Case { nq, nk, q_perm, q_offsets, k_perm, k_offsets, indptr, indices, kinds, q_coords, k_coords, key_valid }
}

fn plan(c: &Case, spatial: Spatial) -> BlockPlan {
    let csr = (c.indptr.clone(), c.indices.clone(), c.kinds.clone());
    let (q_perm, q_offsets, k_perm, k_offsets) = (c.q_perm.clone(), c.q_offsets.clone(), c.k_perm.clone(), c.k_offsets.clone());
    BlockPlan::from_arrays(q_perm, q_offsets, k_perm, k_offsets, csr, c.q_coords.clone(), c.k_coords.clone(), spatial)
        .unwrap()
}

/// Whether query position `p` sees key position `kp` of batch `b` through an entry of kind `kind`: a full entry
/// allows every pair; a masked one needs a valid key and, for the disc, an image query within the disc (text and
/// extra keys always pass it; text queries have no disc).
fn allowed(c: &Case, spatial: Spatial, b: usize, p: usize, kp: usize, kind: i32) -> bool {
    if kind == 0 {
        return true;
    }
    let (q, k) = (&c.q_coords[3 * p..3 * p + 3], &c.k_coords[3 * kp..3 * kp + 3]);
    let disc = match spatial {
        Spatial::None => true,
        Spatial::Disc { max_d2, max_dt } => {
            let (dt, dy, dx) = ((q[0] - k[0]).abs() as i64, (q[1] - k[1]) as i64, (q[2] - k[2]) as i64);
            q[0] < 0 || k[0] < 0 || (dt <= max_dt && dy * dy + dx * dx <= max_d2)
        }
    };
    disc && c.key_valid[b * c.nk + kp] != 0
}

/// Element `(b, h, t, i)` of a `(B, H, N, W)` tensor stored `(B, N, H, W)` (the strided key layout).
fn strided(data: &[f32], n: usize, w: usize, (b, h, t, i): (usize, usize, usize, usize)) -> f64 {
    data[((b * n + t) * HEADS + h) * w + i] as f64
}

/// Attention over the allowed pairs in f64: q, v, dout `(B, H, N, ·)` contiguous, k `(B, Nk, H, D)`; outputs
/// `(B, H, N, ·)` by token.
fn naive(c: &Case, spatial: Spatial, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> Naive {
    let (nq, nk, scale) = (c.nq, c.nk, SCALE as f64);
    let mut r = Naive {
        out: vec![0.0; BATCH * HEADS * nq * DV],
        lse: vec![f64::NEG_INFINITY; BATCH * HEADS * nq],
        dq: vec![0.0; BATCH * HEADS * nq * D],
        dk: vec![0.0; BATCH * HEADS * nk * D],
        dv: vec![0.0; BATCH * HEADS * nk * DV],
    };
    for b in 0..BATCH {
        for h in 0..HEADS {
            let bh = b * HEADS + h;
            for i in 0..c.q_offsets.len() - 1 {
                // (key position, entry kind) of every key in the blocks query block i lists.
                let entries: Vec<(usize, i32)> = (c.indptr[i]..c.indptr[i + 1])
                    .flat_map(|e| {
                        let j = c.indices[e as usize] as usize;
                        (c.k_offsets[j]..c.k_offsets[j + 1]).map(move |kp| (kp as usize, c.kinds[e as usize]))
                    })
                    .collect();
                for p in c.q_offsets[i] as usize..c.q_offsets[i + 1] as usize {
                    let tq = c.q_perm[p] as usize;
                    let row = |x: &[f32], w: usize, t: usize| -> Vec<f64> {
                        x[(bh * nq + t) * w..(bh * nq + t + 1) * w].iter().map(|&a| a as f64).collect()
                    };
                    let (qr, gr) = (row(q, D, tq), row(dout, DV, tq));
                    let seen: Vec<usize> =
                        entries.iter().filter(|&&(kp, kind)| allowed(c, spatial, b, p, kp, kind)).map(|&(kp, _)| c.k_perm[kp] as usize).collect();
                    if seen.is_empty() {
                        continue; // out 0, lse −∞, no gradient
                    }
                    let logits: Vec<f64> =
                        seen.iter().map(|&tk| scale * (0..D).map(|a| qr[a] * strided(k, nk, D, (b, h, tk, a))).sum::<f64>()).collect();
                    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + logits.iter().map(|s| (s - m).exp()).sum::<f64>().ln();
                    r.lse[bh * nq + tq] = lse;
                    let probs: Vec<f64> = logits.iter().map(|s| (s - lse).exp()).collect();
                    let out = &mut r.out[(bh * nq + tq) * DV..(bh * nq + tq + 1) * DV];
                    for (pk, &tk) in probs.iter().zip(&seen) {
                        (0..DV).for_each(|e| out[e] += pk * v[(bh * nk + tk) * DV + e] as f64);
                    }
                    let delta: f64 = (0..DV).map(|e| gr[e] * out[e]).sum();
                    for (pk, &tk) in probs.iter().zip(&seen) {
                        let dp: f64 = (0..DV).map(|e| gr[e] * v[(bh * nk + tk) * DV + e] as f64).sum();
                        let ds = pk * (dp - delta);
                        for (a, qa) in qr.iter().enumerate() {
                            r.dq[(bh * nq + tq) * D + a] += scale * ds * strided(k, nk, D, (b, h, tk, a));
                            r.dk[(bh * nk + tk) * D + a] += scale * ds * qa;
                        }
                        (0..DV).for_each(|e| r.dv[(bh * nk + tk) * DV + e] += pk * gr[e]);
                    }
                }
            }
        }
    }
    r
}

fn run(spatial: Spatial, threads: usize) {
    let c = case();
    let plan = plan(&c, spatial);
    let (nq, nk) = (c.nq, c.nk);
    let (q, k, v) = (values(BATCH * HEADS * nq * D, 1), values(BATCH * nk * HEADS * D, 2), values(BATCH * HEADS * nk * DV, 3));
    let dout = values(BATCH * HEADS * nq * DV, 4);
    let qv = view("q", &q, &[BATCH, HEADS, nq, D]);
    // k as (B, H, Nk, D) over storage laid out (B, Nk, H, D).
    let k_strides = vec![(nk * HEADS * D) as i64, D as i64, (HEADS * D) as i64, 1];
    let kv = View::new("k", k.as_ptr() as usize, "float32", vec![BATCH, HEADS, nk, D], k_strides).unwrap();
    let vv = view("v", &v, &[BATCH, HEADS, nk, DV]);
    let (mut out, mut lse) = (vec![f32::NAN; BATCH * HEADS * nq * DV], vec![f32::NAN; BATCH * HEADS * nq]);
    let (outv, lsev) = (view_mut("out", &mut out, &[BATCH, HEADS, nq, DV]), view_mut("lse", &mut lse, &[BATCH, HEADS, nq]));
    forward(&qv, &kv, &vv, &outv, &lsev, &plan, Some(&c.key_valid), SCALE, threads).unwrap();
    let want = naive(&c, spatial, &q, &k, &v, &dout);
    let tag = format!("{spatial:?} threads={threads}");
    close(&format!("out {tag}"), &out, &want.out, 2e-6);
    close(&format!("lse {tag}"), &lse, &want.lse, 2e-6);
    let delta: Vec<f32> = out.chunks_exact(DV).zip(dout.chunks_exact(DV)).map(|(o, g)| o.iter().zip(g).map(|(a, b)| a * b).sum()).collect();
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; BATCH * HEADS * nk * D], vec![f32::NAN; v.len()]);
    let (doutv, deltav) = (view("dout", &dout, &[BATCH, HEADS, nq, DV]), view("delta", &delta, &[BATCH, HEADS, nq]));
    let dqv = view_mut("dq", &mut dq, &[BATCH, HEADS, nq, D]);
    let (dkv, dvv) = (view_mut("dk", &mut dk, &[BATCH, HEADS, nk, D]), view_mut("dv", &mut dv, &[BATCH, HEADS, nk, DV]));
    backward(&qv, &kv, &vv, &doutv, &lsev, &deltav, &dqv, &dkv, &dvv, &plan, Some(&c.key_valid), SCALE, threads).unwrap();
    close(&format!("dq {tag}"), &dq, &want.dq, 2e-6);
    close(&format!("dk {tag}"), &dk, &want.dk, 2e-6);
    close(&format!("dv {tag}"), &dv, &want.dv, 2e-6);
}

#[test]
fn plan_covers_what_the_test_means_to_cover() {
    let c = case();
    let (mq, mk) = (c.q_offsets.len() - 1, c.k_offsets.len() - 1);
    let keys = |i: usize| -> i64 {
        (c.indptr[i] as usize..c.indptr[i + 1] as usize).map(|e| c.k_offsets[c.indices[e] as usize + 1] - c.k_offsets[c.indices[e] as usize]).sum()
    };
    assert!(keys(0) > PANEL_KEYS as i64, "block 0 spans several panels");
    assert_eq!(keys(3), 0, "block 3 lists nothing");
    // Listed pairs, and those each mask keeps: masked entries must drop some pairs, the disc more than validity.
    let pairs = |spatial: Option<Spatial>| -> usize {
        let mut count = 0;
        for b in 0..BATCH {
            for i in 0..mq {
                for e in c.indptr[i] as usize..c.indptr[i + 1] as usize {
                    let j = c.indices[e] as usize;
                    for p in c.q_offsets[i] as usize..c.q_offsets[i + 1] as usize {
                        for kp in c.k_offsets[j] as usize..c.k_offsets[j + 1] as usize {
                            count += spatial.is_none_or(|s| allowed(&c, s, b, p, kp, c.kinds[e])) as usize;
                        }
                    }
                }
            }
        }
        count
    };
    let (listed, valid, disc) = (pairs(None), pairs(Some(Spatial::None)), pairs(Some(Spatial::Disc { max_d2: 8, max_dt: 0 })));
    assert!(listed > valid && valid > disc && disc > 0, "{listed} {valid} {disc}");
    assert!(c.kinds.contains(&0) && mk >= 10);
}

#[test]
fn matches_naive_loop_with_the_disc_mask() {
    on_every_isa(|| {
        for threads in [1, 3] {
            run(Spatial::Disc { max_d2: 8, max_dt: 0 }, threads);
        }
    });
}

#[test]
fn matches_naive_loop_with_key_validity_only() {
    on_every_isa(|| {
        for threads in [1, 3] {
            run(Spatial::None, threads);
        }
    });
}

#[test]
fn rejects_bad_plans() {
    let with = |spatial: Spatial, f: &dyn Fn(&mut Case)| {
        let mut bad = case();
        f(&mut bad);
        let csr = (bad.indptr.clone(), bad.indices.clone(), bad.kinds.clone());
        BlockPlan::from_arrays(bad.q_perm, bad.q_offsets, bad.k_perm, bad.k_offsets, csr, bad.q_coords, bad.k_coords, spatial)
            .map(drop)
    };
    let disc = Spatial::Disc { max_d2: 8, max_dt: 0 };
    assert!(with(Spatial::None, &|_| {}).is_ok());
    assert!(with(Spatial::None, &|x| x.q_perm[1] = x.q_perm[0]).unwrap_err().0.contains("q_perm"));
    assert!(with(Spatial::None, &|x| x.k_offsets[1] = 0).is_ok()); // an empty key block is allowed
    assert!(with(Spatial::None, &|x| x.k_offsets[2] = 0).unwrap_err().0.contains("k_offsets"));
    assert!(with(Spatial::None, &|x| x.indices[0] = 10_000).unwrap_err().0.contains("out of range"));
    assert!(with(Spatial::None, &|x| x.kinds[0] = 2).unwrap_err().0.contains("kinds"));
    // Coordinates bound the disc's squares; a plan without a disc never squares them.
    assert!(with(disc, &|x| x.q_coords[0] = 40_000).unwrap_err().0.contains("coords"));
    assert!(with(Spatial::None, &|x| x.q_coords[0] = 40_000).is_ok());
}

#[test]
fn rejects_key_validity_of_the_wrong_size() {
    let c = case();
    let p = plan(&c, Spatial::None);
    let (q, k, v) = (values(BATCH * HEADS * c.nq * D, 1), values(BATCH * HEADS * c.nk * D, 2), values(BATCH * HEADS * c.nk * DV, 3));
    let (mut out, mut lse) = (vec![0.0f32; BATCH * HEADS * c.nq * DV], vec![0.0f32; BATCH * HEADS * c.nq]);
    let (qv, kv, vv) = (view("q", &q, &[BATCH, HEADS, c.nq, D]), view("k", &k, &[BATCH, HEADS, c.nk, D]), view("v", &v, &[BATCH, HEADS, c.nk, DV]));
    let (outv, lsev) = (view_mut("out", &mut out, &[BATCH, HEADS, c.nq, DV]), view_mut("lse", &mut lse, &[BATCH, HEADS, c.nq]));
    let short = &c.key_valid[1..];
    assert!(forward(&qv, &kv, &vv, &outv, &lsev, &p, Some(short), SCALE, 1).unwrap_err().0.contains("key_valid"));
}
