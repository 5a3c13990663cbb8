//! LLSA backward, in one of two schedules.
//!
//! - **One pass per `(b, h)` slice** when there are at least `SLICES_PER_THREAD` slices per thread: the slice's task
//!   walks its groups once and computes dq and every key gradient there (each (query block, key) pair's P and dS
//!   are made once, 5 GEMMs per pair); it owns f32 sums of its fine and pooled keys' gradients, then writes `dk`,
//!   `dv` as the fine sum plus the mean-pool backward of every level.
//! - **Two passes** otherwise (few slices: parallelism must come from within a slice). Query side: tasks own a
//!   range of groups and compute their dq and a partial sum of the pooled keys' gradients, reduced over tasks.
//!   Key side: one task per fine key block over the transposed selection recomputes P and dS of its pairs
//!   (7 GEMMs per fine pair) and writes its `dk`, `dv` rows with the same mean-pool backward.

use super::{gather_rows, Inputs, KeyRows, Plan};
use crate::cpu::common::{check_input, check_output, zeros, Dims, LOG2_E};
use crate::cpu::isa::Isa;
use crate::cpu::matmul::{Gemm, Mat, MatMut, Precision};
use crate::cpu::parallel::Team;
use crate::cpu::view::{DType, View, ViewError};
use crate::cpu::vmath::{self, dot};

/// Query blocks gathered at once by the key-side pass.
const KEY_SIDE_CHUNK: usize = 32;
/// Query-side tasks per worker thread the pooled partial sums aim for.
const TASKS_PER_THREAD: usize = 4;
/// The one-pass schedule needs at least this many `(b, h)` slices per thread.
const SLICES_PER_THREAD: usize = 2;

/// The upstream gradient and the forward's results: `dout`, `out (B, H, N, Dv)` (q's dtype) and `lse (B, H, N)` (f32).
pub struct Upstream<'a> {
    pub dout: &'a View,
    pub out: &'a View,
    pub lse: &'a View,
}

/// The gradients `dq, dk (B, H, N, D)`, `dv (B, H, N, Dv)`, contiguous in q's dtype; dk and dv include the
/// gradient that reaches k and v through the pooled tokens.
pub struct Grads<'a> {
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
}

fn check(inp: &Inputs, up: &Upstream, g: &Grads, plan: &Plan) -> Result<Dims, ViewError> {
    let dims = inp.dims(plan)?;
    let (bs, hs, n) = (dims.batch, dims.heads, dims.n);
    check_input(up.dout, &[bs, hs, n, dims.dv], None)?;
    check_input(up.out, &[bs, hs, n, dims.dv], None)?;
    check_input(up.lse, &[bs, hs, n], DType::F32)?;
    let dtype = inp.q.dtype();
    check_output(g.dq, &[bs, hs, n, dims.d], dtype)?;
    check_output(g.dk, &[bs, hs, n, dims.d], dtype)?;
    check_output(g.dv, &[bs, hs, n, dims.dv], dtype)?;
    Ok(dims)
}

/// Writes `dq`, `dk`, `dv` (k and v get their gradients through the fine and the pooled keys).
pub fn backward(
    inp: &Inputs,
    up: &Upstream,
    g: &Grads,
    plan: &Plan,
    scale: f32,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check(inp, up, g, plan)?;
    let team = Team::new(threads);
    let delta = row_deltas(team, up, plan, dims)?;
    let precision = Precision::for_inputs(inp.q.dtype(), Isa::current());
    let ctx = Ctx { inp, up, delta: &delta, plan, dims, scale, precision, team };
    if plan.batch_heads >= SLICES_PER_THREAD * team.threads() {
        ctx.slices(g)
    } else {
        let pooled = ctx.query_side(g.dq, threads)?;
        ctx.key_side(g, &pooled)
    }
}

/// `delta = rowsum(dout ∘ out)`, f32 `(B·H·N)`, computed once here (a torch pass before the kernel would open an
/// OpenMP region whose spinning workers compete with the kernel's threads).
fn row_deltas(team: Team, up: &Upstream, plan: &Plan, dims: Dims) -> Result<Vec<f32>, ViewError> {
    let mut delta = zeros(dims.slices() * dims.n)?;
    team.chunks_mut(
        &mut delta,
        dims.n.max(1),
        || Ok((zeros(dims.dv)?, zeros(dims.dv)?)),
        |(dout, out), bh, rows| {
            let (b, h) = dims.slice(bh);
            for (r, x) in rows.iter_mut().enumerate() {
                up.dout.load_row(&[b, h, plan.row(r)], dout);
                up.out.load_row(&[b, h, plan.row(r)], out);
                *x = dot(dout, out);
            }
            Ok::<(), ViewError>(())
        },
    )?;
    Ok(delta)
}

/// Key gradients in f32, `k (S, R, D)` and `v (S, R, Dv)` for `S` slices of `R` rows: the pooled keys' of every
/// slice (`R = P`), or the fine keys' of one slice (`S = 1`, `R = N`, internal order).
struct KeyGrads {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KeyGrads {
    fn zeros(rows: usize, dims: Dims) -> Result<Self, ViewError> {
        Ok(KeyGrads { k: zeros(rows * dims.d)?, v: zeros(rows * dims.dv)? })
    }
}

struct Ctx<'a> {
    inp: &'a Inputs<'a>,
    up: &'a Upstream<'a>,
    /// `rowsum(dout ∘ out)` per `(b·h, row)`.
    delta: &'a [f32],
    plan: &'a Plan,
    dims: Dims,
    scale: f32,
    precision: Precision,
    team: Team,
}

/// The query side of some rows: q (unscaled), dout, lse in base 2 and delta.
struct QueryRows {
    q: Vec<f32>,
    dout: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    len: usize,
}

impl QueryRows {
    fn new(rows: usize, dims: Dims) -> Result<Self, ViewError> {
        Ok(QueryRows { q: zeros(rows * dims.d)?, dout: zeros(rows * dims.dv)?, lse: zeros(rows)?, delta: zeros(rows)?, len: 0 })
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends rows `[row0, row0 + rows)` of `(b, h)`.
    fn push(&mut self, ctx: &Ctx, b: usize, h: usize, row0: usize, rows: usize) {
        let (d, dv, at) = (ctx.dims.d, ctx.dims.dv, self.len);
        gather_rows(ctx.inp.q, ctx.plan, (b, h), (row0, rows), 1.0, &mut self.q[at * d..(at + rows) * d]);
        gather_rows(ctx.up.dout, ctx.plan, (b, h), (row0, rows), 1.0, &mut self.dout[at * dv..(at + rows) * dv]);
        let first = (b * ctx.dims.heads + h) * ctx.dims.n + row0;
        self.delta[at..at + rows].copy_from_slice(&ctx.delta[first..first + rows]);
        for r in 0..rows {
            self.lse[at + r] = ctx.up.lse.load(&[b, h, row0 + r]) * LOG2_E;
        }
        self.len += rows;
    }
}

impl Ctx<'_> {
    /// `p = exp2(scale·log2e·q·kᵀ + bias − lse)` and `ds = p ∘ (dout·vᵀ − delta)` for query rows `qs` (starting at
    /// row `q0` of `qs`, `lq` rows) against `keys` (`p`, `ds` are `lq x keys.len`; `bias` only when `pooled`).
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        qs: &QueryRows,
        q0: usize,
        lq: usize,
        keys: &KeyRows,
        pooled: bool,
        p: &mut [f32],
        ds: &mut [f32],
    ) {
        let (d, dv, rk) = (self.dims.d, self.dims.dv, keys.len);
        let mul = self.scale * LOG2_E;
        // p = q · kᵀ ; ds = dout · vᵀ
        Gemm { m: lq, n: rk, k: d, accumulate: false }.run_in(self.precision, MatMut::rows(p, rk), Mat::rows(&qs.q[q0 * d..], d), Mat::rows(&keys.k, d).t());
        Gemm { m: lq, n: rk, k: dv, accumulate: false }.run_in(self.precision, MatMut::rows(ds, rk), Mat::rows(&qs.dout[q0 * dv..], dv), Mat::rows(&keys.v, dv).t());
        let bias: &[f32] = if pooled { &keys.bias[..rk] } else { &[] };
        for r in 0..lq {
            let row = &mut p[r * rk..(r + 1) * rk];
            vmath::exp2_affine(row, mul, bias, qs.lse[q0 + r]);
            vmath::softmax_grad(&mut ds[r * rk..(r + 1) * rk], row, qs.delta[q0 + r]);
        }
    }
}

struct GroupBuffers {
    qs: QueryRows,
    pooled: KeyRows,
    fine: KeyRows,
    pp: Vec<f32>,
    dsp: Vec<f32>,
    pf: Vec<f32>,
    dsf: Vec<f32>,
    dq: Vec<f32>,
    /// A key list's gradients before they are added to their rows (pooled keys of a group, or fine keys of a block).
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl GroupBuffers {
    fn new(plan: &Plan, dims: Dims) -> Result<Self, ViewError> {
        let rows = plan.max_group() * plan.block_rows();
        let (rp, rf) = (plan.max_pooled_rows(), plan.max_fine_rows());
        Ok(GroupBuffers {
            qs: QueryRows::new(rows, dims)?,
            pooled: KeyRows::new(rp, dims.d, dims.dv)?,
            fine: KeyRows::new(rf, dims.d, dims.dv)?,
            pp: zeros(rows * rp)?,
            dsp: zeros(rows * rp)?,
            pf: zeros(plan.block_rows() * rf)?,
            dsf: zeros(plan.block_rows() * rf)?,
            dq: zeros(rows * dims.d)?,
            dk: zeros(rp.max(rf) * dims.d)?,
            dv: zeros(rp.max(rf) * dims.dv)?,
        })
    }
}

impl Ctx<'_> {
    /// The one-pass schedule: a task per `(b, h)` slice computes dq and the slice's fine and pooled keys' gradients
    /// in one walk over its groups, then writes `dk`, `dv`.
    fn slices(&self, g: &Grads) -> Result<(), ViewError> {
        let (plan, dims) = (self.plan, self.dims);
        self.team.for_each_init(
            plan.batch_heads,
            || Ok((GroupBuffers::new(plan, dims)?, KeyGrads::zeros(plan.pooled_tokens(), dims)?, KeyGrads::zeros(dims.n, dims)?)),
            |(buf, pooled, fine), bh| {
                for x in [&mut pooled.k, &mut pooled.v, &mut fine.k, &mut fine.v] {
                    x.fill(0.0);
                }
                for group in plan.groups(bh)? {
                    self.query_group(g.dq, bh, group, buf, (&mut pooled.k, &mut pooled.v), Some(fine));
                }
                pooled.k.iter_mut().for_each(|x| *x *= self.scale);
                self.store_keys(g, (&pooled.k, &pooled.v), bh, 0, &mut fine.k, &mut fine.v);
                Ok(())
            },
        )
    }

    /// dq for every query row, and the pooled keys' gradients: tasks `(b·h, split)` own a range of groups and a
    /// partial sum of the pooled gradients of their `(b, h)`; the partial sums are then added per pooled row.
    fn query_side(&self, dq: &View, threads: usize) -> Result<KeyGrads, ViewError> {
        let (plan, dims) = (self.plan, self.dims);
        let groups: Vec<Vec<(usize, usize)>> = self.team.map(plan.batch_heads, |bh| plan.groups(bh))?;
        let fewest = groups.iter().map(Vec::len).min().unwrap_or(1).max(1);
        // Splits of a head's groups: enough tasks for the pool, at most ~N/P (partial sums stay smaller than k).
        let wanted = (TASKS_PER_THREAD * threads.max(1)).div_ceil(plan.batch_heads);
        let pooled = plan.pooled_tokens();
        let splits = wanted.min(fewest).min((plan.n / pooled.max(1)).max(1)).max(1);
        let (pd, pdv) = (pooled * dims.d, pooled * dims.dv);
        let mut part_k = zeros(plan.batch_heads * splits * pd)?;
        let mut part_v = zeros(plan.batch_heads * splits * pdv)?;
        self.team.zip_chunks_mut(
            (&mut part_k, pd.max(1)),
            (&mut part_v, pdv.max(1)),
            || GroupBuffers::new(plan, dims),
            |buf, task, acc_k, acc_v| {
                let (bh, split) = (task / splits, task % splits);
                let mine = &groups[bh];
                let (lo, hi) = (mine.len() * split / splits, mine.len() * (split + 1) / splits);
                for &group in &mine[lo..hi] {
                    self.query_group(dq, bh, group, buf, (acc_k, acc_v), None);
                }
                Ok(())
            },
        )?;
        if splits == 1 {
            part_k.iter_mut().for_each(|x| *x *= self.scale);
            return Ok(KeyGrads { k: part_k, v: part_v });
        }
        Ok(KeyGrads {
            k: self.reduce_splits(&part_k, splits, dims.d, self.scale)?,
            v: self.reduce_splits(&part_v, splits, dims.dv, 1.0)?,
        })
    }

    /// dq of the group's rows; its pooled keys' gradients (dk unscaled) added to `pooled` (`P x D`, `P x Dv`) and,
    /// given `fine` (`N` rows), its fine keys' gradients (dk unscaled) added there.
    fn query_group(
        &self,
        dq: &View,
        bh: usize,
        (j0, j1): (usize, usize),
        buf: &mut GroupBuffers,
        pooled: (&mut [f32], &mut [f32]),
        mut fine: Option<&mut KeyGrads>,
    ) {
        let (plan, d, dv) = (self.plan, self.dims.d, self.dims.dv);
        let (b, h) = self.dims.slice(bh);
        let row0 = j0 * plan.block;
        let rows = (j1 * plan.block).min(plan.n) - row0;
        buf.qs.clear();
        buf.qs.push(self, b, h, row0, rows);
        buf.pooled.gather_pooled(self.inp, plan, self.dims, b, h, plan.pooled_ids(bh, j0));
        let rp = buf.pooled.len;
        let (pp, dsp) = (&mut buf.pp[..rows * rp], &mut buf.dsp[..rows * rp]);
        self.probabilities(&buf.qs, 0, rows, &buf.pooled, true, pp, dsp);
        // dq = dS · kp over the pooled keys
        Gemm { m: rows, n: d, k: rp, accumulate: false }.run_in(self.precision, MatMut::rows(&mut buf.dq, d), Mat::rows(dsp, rp), Mat::rows(&buf.pooled.k, d));
        for j in j0..j1 {
            let r0 = (j - j0) * plan.block;
            let lq = plan.fine_block(j).1;
            buf.fine.gather_fine(self.inp, plan, self.dims, b, h, plan.fine_ids(bh, j));
            let rf = buf.fine.len;
            let (pf, dsf) = (&mut buf.pf[..lq * rf], &mut buf.dsf[..lq * rf]);
            self.probabilities(&buf.qs, r0, lq, &buf.fine, false, pf, dsf);
            // dq += dS · k over query block j's fine keys
            Gemm { m: lq, n: d, k: rf, accumulate: true }.run_in(self.precision, MatMut::rows(&mut buf.dq[r0 * d..], d), Mat::rows(dsf, rf), Mat::rows(&buf.fine.k, d));
            if let Some(fine) = fine.as_deref_mut() {
                // dk = dSᵀ · q ; dv = Pᵀ · dout of the fine keys, then added to their rows
                let (q, dout) = (Mat::rows(&buf.qs.q[r0 * d..], d), Mat::rows(&buf.qs.dout[r0 * dv..], dv));
                Gemm { m: rf, n: d, k: lq, accumulate: false }.run_in(self.precision, MatMut::rows(&mut buf.dk, d), Mat::rows(dsf, rf).t(), q);
                Gemm { m: rf, n: dv, k: lq, accumulate: false }.run_in(self.precision, MatMut::rows(&mut buf.dv, dv), Mat::rows(pf, rf).t(), dout);
                let ids = plan.fine_ids(bh, j).iter().map(|&p| plan.fine_block(p as usize));
                scatter_add((&mut fine.k, &mut fine.v), ids, (&buf.dk, &buf.dv), (d, dv));
            }
        }
        for r in 0..rows {
            let row = &mut buf.dq[r * d..(r + 1) * d];
            row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: `dq` is a validated contiguous output; groups partition the query rows of (b, h) and
            // `plan.row` is a permutation, so this task is the only one touching this row.
            unsafe { dq.store_row(&[b, h, plan.row(row0 + r)], row) };
        }
        // The group's pooled-key gradients (dk = dSᵀ · q ; dv = Pᵀ · dout), added to the task's sum.
        Gemm { m: rp, n: d, k: rows, accumulate: false }.run_in(self.precision, MatMut::rows(&mut buf.dk, d), Mat::rows(dsp, rp).t(), Mat::rows(&buf.qs.q, d));
        Gemm { m: rp, n: dv, k: rows, accumulate: false }.run_in(self.precision, MatMut::rows(&mut buf.dv, dv), Mat::rows(pp, rp).t(), Mat::rows(&buf.qs.dout, dv));
        let ids = plan.pooled_ids(bh, j0).iter().map(|&p| plan.pooled_block(p as usize));
        scatter_add(pooled, ids, (&buf.dk, &buf.dv), (d, dv));
    }

    /// `mul · Σ_split part` per `(b·h, pooled row)`: `part` is `(B·H, splits, P, width)`, the result `(B·H, P, width)`.
    fn reduce_splits(&self, part: &[f32], splits: usize, width: usize, mul: f32) -> Result<Vec<f32>, ViewError> {
        let p = self.plan.pooled_tokens();
        let mut out = zeros(self.plan.batch_heads * p * width)?;
        self.team.chunks_mut(&mut out, (p * width).max(1), || Ok(()), |_, bh, dst| {
            for s in 0..splits {
                add_rows(dst, &part[(bh * splits + s) * p * width..(bh * splits + s + 1) * p * width]);
            }
            dst.iter_mut().for_each(|x| *x *= mul);
            Ok(())
        })?;
        Ok(out)
    }
}

fn add_rows(dst: &mut [f32], src: &[f32]) {
    vmath::add_scaled(dst, src, 1.0);
}

/// Adds the consecutive row runs of `src` (`k` rows of `d`, `v` rows of `dv`) to the runs `(first row, rows)` of
/// `dst`, in order.
fn scatter_add(
    dst: (&mut [f32], &mut [f32]),
    runs: impl Iterator<Item = (usize, usize)>,
    src: (&[f32], &[f32]),
    (d, dv): (usize, usize),
) {
    let mut at = 0;
    for (t0, len) in runs {
        add_rows(&mut dst.0[t0 * d..(t0 + len) * d], &src.0[at * d..(at + len) * d]);
        add_rows(&mut dst.1[t0 * dv..(t0 + len) * dv], &src.1[at * dv..(at + len) * dv]);
        at += len;
    }
}

struct KeyBuffers {
    qs: QueryRows,
    keys: KeyRows,
    p: Vec<f32>,
    ds: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl Ctx<'_> {
    /// `dk`, `dv`: one task per `(b·h, fine key block)` over the query blocks that selected it, plus the pooled
    /// gradients of every level spread back to the block's rows.
    fn key_side(&self, g: &Grads, pooled: &KeyGrads) -> Result<(), ViewError> {
        let (plan, dims) = (self.plan, self.dims);
        let transposed: Vec<(Vec<usize>, Vec<u32>)> = self.team.map(plan.batch_heads, |bh| plan.transpose(bh))?;
        let (rows, lk) = (KEY_SIDE_CHUNK * plan.block_rows(), plan.block_rows());
        self.team.for_each_init(
            plan.batch_heads * plan.n_blocks,
            || {
                Ok(KeyBuffers {
                    qs: QueryRows::new(rows, dims)?,
                    keys: KeyRows::new(lk, dims.d, dims.dv)?,
                    p: zeros(rows * lk)?,
                    ds: zeros(rows * lk)?,
                    dk: zeros(lk * dims.d)?,
                    dv: zeros(lk * dims.dv)?,
                })
            },
            |buf, task| {
                let (bh, p) = (task / plan.n_blocks, task % plan.n_blocks);
                let (indptr, indices) = &transposed[bh];
                self.key_block(bh, p, &indices[indptr[p]..indptr[p + 1]], buf);
                let (r0, lk) = plan.fine_block(p);
                let (pk, pv) = (plan.pooled_tokens() * dims.d, plan.pooled_tokens() * dims.dv);
                let slice = (&pooled.k[bh * pk..(bh + 1) * pk], &pooled.v[bh * pv..(bh + 1) * pv]);
                self.store_keys(g, slice, bh, r0, &mut buf.dk[..lk * dims.d], &mut buf.dv[..lk * dims.dv]);
                Ok(())
            },
        )
    }

    fn key_block(&self, bh: usize, p: usize, choosers: &[u32], buf: &mut KeyBuffers) {
        let (plan, d, dv) = (self.plan, self.dims.d, self.dims.dv);
        let (b, h) = self.dims.slice(bh);
        buf.keys.gather_fine(self.inp, plan, self.dims, b, h, &[p as u32]);
        let lk = buf.keys.len;
        buf.dk[..lk * d].fill(0.0);
        buf.dv[..lk * dv].fill(0.0);
        for chunk in choosers.chunks(KEY_SIDE_CHUNK) {
            buf.qs.clear();
            for &j in chunk {
                let (r0, rows) = plan.fine_block(j as usize);
                buf.qs.push(self, b, h, r0, rows);
            }
            let tq = buf.qs.len;
            let (pt, ds) = (&mut buf.p[..tq * lk], &mut buf.ds[..tq * lk]);
            self.probabilities(&buf.qs, 0, tq, &buf.keys, false, pt, ds);
            // dv += Pᵀ · dout ; dk += dSᵀ · q
            Gemm { m: lk, n: dv, k: tq, accumulate: true }.run_in(self.precision, MatMut::rows(&mut buf.dv, dv), Mat::rows(pt, lk).t(), Mat::rows(&buf.qs.dout, dv));
            Gemm { m: lk, n: d, k: tq, accumulate: true }.run_in(self.precision, MatMut::rows(&mut buf.dk, d), Mat::rows(ds, lk).t(), Mat::rows(&buf.qs.q, d));
        }
    }

    /// Writes `dk`, `dv` of the internal rows `row0..` of slice `bh`: `scale · dk` and `dv` of the fine keys (as many
    /// rows as `dk` holds; overwritten) plus, at every level, the ancestor's pooled gradient times the row's weight
    /// in it (the mean-pool backward, `Plan::pool_weight`; `pooled` holds the slice's `P` rows, dk already scaled).
    fn store_keys(&self, g: &Grads, pooled: (&[f32], &[f32]), bh: usize, row0: usize, dk: &mut [f32], dv: &mut [f32]) {
        let (plan, d, dvw) = (self.plan, self.dims.d, self.dims.dv);
        let (b, h) = self.dims.slice(bh);
        for (r, (dk_row, dv_row)) in dk.chunks_exact_mut(d).zip(dv.chunks_exact_mut(dvw)).enumerate() {
            let token = row0 + r;
            dk_row.iter_mut().for_each(|x| *x *= self.scale);
            for level in 1..=plan.levels() {
                let weight = plan.pool_weight(token, level);
                let row = plan.level_rows[level - 1] + token / plan.span(level);
                vmath::add_scaled(dk_row, &pooled.0[row * d..(row + 1) * d], weight);
                vmath::add_scaled(dv_row, &pooled.1[row * dvw..(row + 1) * dvw], weight);
            }
            // SAFETY: `dk`, `dv` are validated contiguous outputs; fine key blocks partition the rows of (b, h) and
            // `plan.row` is a permutation, so this task is the only one touching this row of either.
            unsafe {
                g.dk.store_row(&[b, h, plan.row(token)], dk_row);
                g.dv.store_row(&[b, h, plan.row(token)], dv_row);
            }
        }
    }
}


