//! The LLSA kernels against naive f64 loops over the same selection, and the plan's checks and transpose.

use super::*;
use crate::cpu::test_support::{on_every_isa, view_of};

/// Deterministic pseudo-random numbers in [0, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.next() * 3.0 - 1.5) as f32).collect()
    }

    /// `count` distinct values of `0..bound`.
    fn distinct(&mut self, count: usize, bound: usize) -> Vec<i32> {
        let mut ids: Vec<i32> = (0..bound as i32).collect();
        for i in 0..count {
            let j = i + (self.next() * (bound - i) as f64) as usize;
            ids.swap(i, j);
        }
        ids.truncate(count);
        ids
    }
}

/// One problem: `bh` heads of N tokens, blocks of `block`, P pooled tokens in blocks, a random selection.
struct Case {
    bh: usize,
    n: usize,
    block: usize,
    d: usize,
    dv: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kp: Vec<f32>,
    vp: Vec<f32>,
    fine: Vec<i32>,
    pooled: Vec<i32>,
    k_fine: usize,
    k_pooled: usize,
    offsets: Vec<i32>,
    pbias: Vec<f32>,
}

impl Case {
    /// Two pooled levels of `ceil(N/b)` and `ceil(N/b²)` tokens (arbitrary values: the kernels do not care how they
    /// were pooled), in blocks of `b`; siblings (pairs of query blocks) share their pooled blocks.
    fn new(seed: u64, n: usize, block: usize, d: usize, dv: usize, k_fine: usize) -> Self {
        let mut rng = Rng(seed);
        let bh = 2;
        let n_blocks = n.div_ceil(block);
        let sizes = [n_blocks, n_blocks.div_ceil(block)];
        let mut offsets = vec![0i32];
        let mut pbias = Vec::new();
        for (level, (&size, start)) in sizes.iter().zip([0, sizes[0]]).enumerate() {
            offsets.extend((block..size).step_by(block).map(|r| (start + r) as i32));
            offsets.push((start + size) as i32);
            let span = block.pow(level as u32 + 1);
            pbias.extend((0..size).map(|c| (span.min(n - c * span) as f32).log2()));
        }
        let (pooled_tokens, num_pooled_blocks) = (sizes[0] + sizes[1], offsets.len() - 1);
        let k_pooled = 2.min(num_pooled_blocks);
        let mut fine = Vec::new();
        let mut pooled = Vec::new();
        for _ in 0..bh {
            let mut shared = rng.distinct(k_pooled, num_pooled_blocks);
            for j in 0..n_blocks {
                fine.extend(rng.distinct(k_fine, n_blocks));
                if j % 2 == 0 {
                    shared = rng.distinct(k_pooled, num_pooled_blocks);
                }
                pooled.extend(&shared);
            }
        }
        Case {
            bh,
            n,
            block,
            d,
            dv,
            q: rng.values(bh * n * d),
            k: rng.values(bh * n * d),
            v: rng.values(bh * n * dv),
            kp: rng.values(bh * pooled_tokens * d),
            vp: rng.values(bh * pooled_tokens * dv),
            fine,
            pooled,
            k_fine,
            k_pooled,
            offsets,
            pbias,
        }
    }

    fn n_blocks(&self) -> usize {
        self.n.div_ceil(self.block)
    }

    fn pooled_tokens(&self) -> usize {
        *self.offsets.last().unwrap() as usize
    }

    fn plan(&self) -> Result<Plan, ViewError> {
        let nb = self.n_blocks();
        Plan::new(
            &view_of("fine", &self.fine, "int32", &[1, self.bh, nb, self.k_fine]),
            &view_of("pooled", &self.pooled, "int32", &[1, self.bh, nb, self.k_pooled]),
            &view_of("pb_offsets", &self.offsets, "int32", &[self.offsets.len()]),
            &view_of("pbias", &self.pbias, "float32", &[self.pbias.len()]),
            self.n,
            self.block,
            2,
        )
    }

    /// Per query row of head `h`: the keys `(pooled?, row)` it attends.
    fn keys(&self, h: usize, t: usize) -> Vec<(bool, usize)> {
        let j = t / self.block;
        let mut keys = Vec::new();
        for &p in &self.fine[(h * self.n_blocks() + j) * self.k_fine..][..self.k_fine] {
            let r0 = p as usize * self.block;
            keys.extend((r0..(r0 + self.block).min(self.n)).map(|r| (false, r)));
        }
        for &p in &self.pooled[(h * self.n_blocks() + j) * self.k_pooled..][..self.k_pooled] {
            keys.extend((self.offsets[p as usize] as usize..self.offsets[p as usize + 1] as usize).map(|r| (true, r)));
        }
        keys
    }

    fn key(&self, h: usize, (pooled, r): (bool, usize)) -> (&[f32], &[f32], f64) {
        if pooled {
            let p = self.pooled_tokens();
            (
                &self.kp[(h * p + r) * self.d..][..self.d],
                &self.vp[(h * p + r) * self.dv..][..self.dv],
                self.pbias[r] as f64 * std::f64::consts::LN_2,
            )
        } else {
            (&self.k[(h * self.n + r) * self.d..][..self.d], &self.v[(h * self.n + r) * self.dv..][..self.dv], 0.0)
        }
    }

    /// Softmax probabilities of query `t` of head `h` over `keys(h, t)`, in f64.
    fn probs(&self, h: usize, t: usize, scale: f64) -> Vec<f64> {
        let q = &self.q[(h * self.n + t) * self.d..][..self.d];
        let logits: Vec<f64> = self
            .keys(h, t)
            .into_iter()
            .map(|key| {
                let (k, _, bias) = self.key(h, key);
                scale * q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + bias
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    }

    fn naive_out(&self, scale: f64) -> Vec<f64> {
        let mut out = vec![0.0; self.bh * self.n * self.dv];
        for h in 0..self.bh {
            for t in 0..self.n {
                for (p, key) in self.probs(h, t, scale).into_iter().zip(self.keys(h, t)) {
                    let (_, v, _) = self.key(h, key);
                    for c in 0..self.dv {
                        out[(h * self.n + t) * self.dv + c] += p * v[c] as f64;
                    }
                }
            }
        }
        out
    }

    /// `(dq, dk, dv)` in f64 for upstream gradient `dout`, k and v through the fine and the pooled keys (the pooled
    /// rows' gradients spread to the fine tokens under them: over their counts when the levels pool fine tokens; over
    /// the level-1 parent's children, times over the level-2 parent's children, when they pool children).
    fn naive_grads(&self, dout: &[f32], scale: f64, pooling: Pooling) -> [Vec<f64>; 3] {
        let [dq, mut dk, mut dv, dkp, dvp] = self.naive_grads_split(dout, scale);
        let (n, b, level1) = (self.n, self.block, self.n.div_ceil(self.block));
        for h in 0..self.bh {
            for t in 0..n {
                let children_1 = b.min(n - (t / b) * b) as f64;
                let children_2 = b.min(level1 - (t / (b * b)) * b) as f64;
                for (level, row) in [(1, t / b), (2, level1 + t / (b * b))] {
                    let span = b.pow(level);
                    let count = match (pooling, level) {
                        (Pooling::Tokens, _) => span.min(n - (t / span) * span) as f64,
                        (Pooling::Children, 1) => children_1,
                        (Pooling::Children, _) => children_1 * children_2,
                    };
                    let p = h * self.pooled_tokens() + row;
                    for c in 0..self.d {
                        dk[(h * n + t) * self.d + c] += dkp[p * self.d + c] / count;
                    }
                    for c in 0..self.dv {
                        dv[(h * n + t) * self.dv + c] += dvp[p * self.dv + c] / count;
                    }
                }
            }
        }
        [dq, dk, dv]
    }

    /// `(dq, dk, dv, dkp, dvp)` in f64 with the fine and pooled keys separate.
    fn naive_grads_split(&self, dout: &[f32], scale: f64) -> [Vec<f64>; 5] {
        let (n, d, dv, p) = (self.n, self.d, self.dv, self.pooled_tokens());
        let mut g = [
            vec![0.0; self.bh * n * d],
            vec![0.0; self.bh * n * d],
            vec![0.0; self.bh * n * dv],
            vec![0.0; self.bh * p * d],
            vec![0.0; self.bh * p * dv],
        ];
        for h in 0..self.bh {
            for t in 0..n {
                let q = &self.q[(h * n + t) * d..][..d];
                let dout = &dout[(h * n + t) * dv..][..dv];
                let keys = self.keys(h, t);
                let probs = self.probs(h, t, scale);
                let dps: Vec<f64> = keys
                    .iter()
                    .map(|&key| self.key(h, key).1.iter().zip(dout).map(|(a, b)| *a as f64 * *b as f64).sum())
                    .collect();
                let delta: f64 = probs.iter().zip(&dps).map(|(a, b)| a * b).sum();
                for ((&key, p_i), dp) in keys.iter().zip(&probs).zip(&dps) {
                    let ds = p_i * (dp - delta);
                    let (k, _, _) = self.key(h, key);
                    let (gk, gv, rows) = if key.0 { (3, 4, p) } else { (1, 2, n) };
                    for c in 0..d {
                        g[0][(h * n + t) * d + c] += scale * ds * k[c] as f64;
                        g[gk][(h * rows + key.1) * d + c] += scale * ds * q[c] as f64;
                    }
                    for c in 0..dv {
                        g[gv][(h * rows + key.1) * dv + c] += p_i * dout[c] as f64;
                    }
                }
            }
        }
        g
    }
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / scale
}

fn run(case: &Case, threads: usize, pooling: Pooling) {
    let (bh, n, d, dv, p) = (case.bh, case.n, case.d, case.dv, case.pooled_tokens());
    let scale = 0.37f32;
    let plan = case.plan().unwrap().with_pooling(pooling);
    let (q, k, v) = (
        view_of("q", &case.q, "float32", &[1, bh, n, d]),
        view_of("k", &case.k, "float32", &[1, bh, n, d]),
        view_of("v", &case.v, "float32", &[1, bh, n, dv]),
    );
    let (kp, vp) =
        (view_of("kp", &case.kp, "float32", &[1, bh, p, d]), view_of("vp", &case.vp, "float32", &[1, bh, p, dv]));
    let inputs = Inputs { q: &q, k: &k, v: &v, kp: &kp, vp: &vp };
    let out = vec![f32::NAN; bh * n * dv];
    let lse = vec![f32::NAN; bh * n];
    forward(
        &inputs,
        &view_of("out", &out, "float32", &[1, bh, n, dv]),
        &view_of("lse", &lse, "float32", &[1, bh, n]),
        &plan,
        scale,
        threads,
    )
    .unwrap();
    let want = case.naive_out(scale as f64);
    assert!(max_err(&out, &want) < 1e-5, "forward error {}", max_err(&out, &want));

    let dout = Rng(99).values(bh * n * dv);
    let grads: Vec<Vec<f32>> = [n * d, n * d, n * dv].iter().map(|&s| vec![f32::NAN; bh * s]).collect();
    let gviews = [
        view_of("dq", &grads[0], "float32", &[1, bh, n, d]),
        view_of("dk", &grads[1], "float32", &[1, bh, n, d]),
        view_of("dv", &grads[2], "float32", &[1, bh, n, dv]),
    ];
    let up = Upstream {
        dout: &view_of("dout", &dout, "float32", &[1, bh, n, dv]),
        out: &view_of("out", &out, "float32", &[1, bh, n, dv]),
        lse: &view_of("lse", &lse, "float32", &[1, bh, n]),
    };
    let g = Grads { dq: &gviews[0], dk: &gviews[1], dv: &gviews[2] };
    backward(&inputs, &up, &g, &plan, scale, threads).unwrap();
    let want = case.naive_grads(&dout, scale as f64, pooling);
    for (i, (got, want)) in grads.iter().zip(&want).enumerate() {
        assert!(max_err(got, want) < 1e-5, "gradient {i} error {}", max_err(got, want));
    }
}

#[test]
fn forward_and_backward_match_naive_loops() {
    on_every_isa(|| {
        // Two (b, h) slices: one thread runs the one-pass backward, two and three threads the two-pass one.
        // N = 37, blocks of 4: the last level-1 token holds 1 token and the last level-2 token 2 children (5 tokens),
        // so the two pooling rules' backwards differ.
        for pooling in [Pooling::Children, Pooling::Tokens] {
            for threads in [1, 3] {
                run(&Case::new(1, 37, 4, 5, 3, 2), threads, pooling);
                run(&Case::new(2, 37, 4, 72, 9, 3), threads, pooling);
            }
            run(&Case::new(3, 16, 4, 8, 8, 4), 2, pooling);
            run(&Case::new(4, 16, 4, 8, 8, 4), 1, pooling);
        }
    });
}

#[test]
fn plan_rejects_bad_selections() {
    let fresh = || Case::new(4, 37, 4, 5, 3, 2);
    let mut case = fresh();
    case.fine[3] = 10; // 10 fine blocks: ids 0..10
    assert!(case.plan().is_err());
    let mut case = fresh();
    case.pooled[0] = 4; // 4 pooled blocks
    assert!(case.plan().is_err());
    let mut case = fresh();
    case.offsets = vec![0, 5, 8, 10, 13]; // a block longer than block_size
    assert!(case.plan().is_err());
    let mut case = fresh();
    case.offsets = vec![0, 4, 8, 10, 12]; // 12 pooled rows, but 2 levels of N=37 have 13
    case.pbias.pop();
    assert!(case.plan().is_err());
    let mut case = fresh();
    case.pbias[2] = f32::NAN;
    assert!(case.plan().is_err());
    let case = fresh();
    let plan_with = |fine_blocks: usize, levels: usize| {
        Plan::new(
            &view_of("fine", &case.fine, "int32", &[1, 2, fine_blocks, 2]),
            &view_of("pooled", &case.pooled, "int32", &[1, 2, 10, 2]),
            &view_of("pb_offsets", &case.offsets, "int32", &[5]),
            &view_of("pbias", &case.pbias, "float32", &[13]),
            37,
            4,
            levels,
        )
    };
    assert!(plan_with(10, 2).is_ok());
    assert!(plan_with(9, 2).is_err());
    assert!(plan_with(10, 1).is_err());
}

#[test]
fn transpose_lists_every_chooser_once_in_order() {
    let case = Case::new(5, 37, 4, 5, 3, 3);
    let plan = case.plan().unwrap();
    for bh in 0..case.bh {
        let (indptr, indices) = plan.transpose(bh).unwrap();
        for p in 0..plan.n_blocks {
            let want: Vec<u32> =
                (0..plan.n_blocks as u32).filter(|&j| plan.fine_ids(bh, j as usize).contains(&(p as u32))).collect();
            assert_eq!(&indices[indptr[p]..indptr[p + 1]], &want[..]);
        }
    }
}

#[test]
fn groups_are_runs_of_equal_pooled_blocks() {
    let case = Case::new(6, 37, 4, 5, 3, 2);
    let plan = case.plan().unwrap();
    for bh in 0..case.bh {
        let groups = plan.groups(bh).unwrap();
        assert_eq!(groups.first().unwrap().0, 0);
        assert_eq!(groups.last().unwrap().1, plan.n_blocks);
        for w in groups.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        for &(j0, j1) in &groups {
            assert!((j0..j1).all(|j| plan.pooled_ids(bh, j) == plan.pooled_ids(bh, j0)));
        }
    }
}

#[test]
fn rows_must_be_a_permutation() {
    let case = Case::new(7, 37, 4, 5, 3, 2);
    let with = |rows: &[i64]| case.plan().unwrap().with_rows(&view_of("rows", rows, "int64", &[rows.len()]));
    let mut rows: Vec<i64> = (0..37).rev().collect();
    let plan = with(&rows).unwrap();
    assert_eq!((plan.row(0), plan.row(36)), (36, 0));
    rows[3] = rows[4]; // a repeated row would have two writers
    assert!(with(&rows).is_err());
    assert!(with(&rows[..36]).is_err());
    rows[3] = 37;
    assert!(with(&rows).is_err());
}
