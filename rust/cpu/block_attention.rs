//! The attention engine over block plans, on CPU: for each query block, one online softmax over its list of
//! key blocks (full blocks without mask work, masked blocks with the element mask), and the matching backward
//! (dq per query block; dk, dv per key block over the transposed plan, so no two tasks write the same row).
//!
//! Layouts: q, k `(B, H, N, D)`, v `(B, H, Nk, Dv)`, any strides; rows are gathered through the plan's
//! permutations, so callers never permute tensors. Computation in f32, softmax in base 2.

use super::common::{active_isa, check_input, check_output, gather, zeros, Dims, OnlineSoftmax, LOG2_E};
use crate::alloc;
use super::matmul::{Gemm, Mat, MatMut, Precision};
use super::parallel::Team;
use super::isa::Isa;
use super::vmath;
use super::view::{err, DType, View, ViewError};
use crate::plan::blocks::{BlockPlan, Spatial, MASKED};
/// Keys per forward GEMM: consecutive key blocks of a query block are gathered into one panel up to this many
/// keys (larger GEMMs, fewer online-softmax passes).
const PANEL_KEYS: usize = 256;
/// The backward runs one pass per (b, h) slice when there are at least this many slices per thread (otherwise
/// two passes, over query blocks then key blocks, which parallelise within a slice).
const SLICES_PER_THREAD: usize = 2;

/// Sets disallowed logits of a block pair to −∞ (`s` holds `rows` rows of `cols` logits at row stride `stride`,
/// for query positions `q0..` and key positions `k0..` of `plan`): keys that `key_valid` (`(B, Nk)` in key layout
/// order, 0 = invalid) marks invalid for batch `b`, and for a disc plan the image pairs with `|dt| > max_dt` or
/// `dy² + dx² > max_d2` (text and extra tokens on either side are always allowed).
#[allow(clippy::too_many_arguments)]
fn apply_mask(plan: &BlockPlan, key_valid: Option<&[i32]>, b: usize, q0: usize, k0: usize, rows: usize, cols: usize,
              s: &mut [f32], stride: usize) {
    let nk = plan.k_perm().len();
    let valid = key_valid.map(|v| &v[b * nk + k0..b * nk + k0 + cols]);
    let keys = plan.key_columns();
    let span = k0..k0 + cols;
    let (kt, ky, kx) = (&keys.t[span.clone()], &keys.y[span.clone()], &keys.x[span]);
    for r in 0..rows {
        let row = &mut s[r * stride..r * stride + cols];
        let qc = &plan.q_coords()[3 * (q0 + r)..3 * (q0 + r) + 3];
        if let Spatial::Disc { max_d2, max_dt } = plan.spatial() {
            if qc[0] >= 0 {
                let limits = (max_d2.min(i32::MAX as i64) as i32, max_dt.min(i32::MAX as i64) as i32);
                mask_disc_row(Isa::current(), row, (qc[0], qc[1], qc[2]), (kt, ky, kx), limits);
            }
        }
        if let Some(valid) = valid {
            row.iter_mut().zip(valid).for_each(|(x, &ok)| *x = if ok == 0 { f32::NEG_INFINITY } else { *x });
        }
    }
}

#[inline(always)]
fn mask_disc_row_body<const FMA: bool, const W: usize>(row: &mut [f32], q: (i32, i32, i32), keys: (&[i32], &[i32], &[i32]), limits: (i32, i32)) {
    let n = row.len();
    let (kt, ky, kx) = (&keys.0[..n], &keys.1[..n], &keys.2[..n]);
    let (max_d2, max_dt) = limits;
    for (c, x) in row.iter_mut().enumerate() {
        // Coordinates of a disc plan lie in -2..2^15 (checked by `BlockPlan::from_arrays`), so the squares cannot overflow.
        let (dt, dy, dx) = ((q.0 - kt[c]).abs(), q.1 - ky[c], q.2 - kx[c]);
        let inside = kt[c] < 0 || (dt <= max_dt && dy * dy + dx * dx <= max_d2);
        *x = if inside { *x } else { f32::NEG_INFINITY };
    }
}

crate::isa_dispatch!(
    /// The disc mask of one image query row over `row.len()` keys (see [`apply_mask`]).
    fn mask_disc_row(row: &mut [f32], q: (i32, i32, i32), keys: (&[i32], &[i32], &[i32]), limits: (i32, i32)) = mask_disc_row_body
);

/// Checks q, k, v against each other and the plan; `Dims::n` is the query count.
fn check_inputs(q: &View, k: &View, v: &View, plan: &BlockPlan, key_valid: Option<&[i32]>) -> Result<Dims, ViewError> {
    q.expect(4, true)?;
    v.expect(4, true)?;
    let [batch, heads, nq, d] = q.shape()[..] else { unreachable!("4 dims checked") };
    let (nk, dv) = (k.shape().get(2).copied().unwrap_or(0), v.shape()[3]);
    check_input(k, &[batch, heads, nk, d], q.dtype())?;
    check_input(v, &[batch, heads, nk, dv], q.dtype())?;
    if plan.q_perm().len() != nq || plan.k_perm().len() != nk {
        return err("plan does not match the sequence lengths of q and k");
    }
    if let Some(valid) = key_valid {
        if valid.len() != batch * nk {
            return err(format!("key_valid: need {batch} x {nk} values, got {}", valid.len()));
        }
    }
    Ok(Dims { batch, heads, n: nq, d, dv })
}

/// Forward: writes `out (B, H, Nq, Dv)` (q's dtype, contiguous) and `lse (B, H, Nq)` (f32, natural log of
/// the softmax denominator of `scale · q·k`, −∞ for a query with no allowed key). `key_valid`: `(B, Nk)` in the
/// plan's key order, 0 for keys masked entries must skip.
#[allow(clippy::too_many_arguments)]
pub fn forward(q: &View, k: &View, v: &View, out: &View, lse: &View, plan: &BlockPlan, key_valid: Option<&[i32]>,
               scale: f32, threads: usize) -> Result<(), ViewError> {
    let dims = check_inputs(q, k, v, plan, key_valid)?;
    let precision = Precision::for_inputs(q.dtype(), active_isa()?);
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], q.dtype())?;
    check_output(lse, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    let (bq, bk) = (plan.max_q_block(), plan.max_k_block());
    let mq = plan.num_query_blocks();
    let tasks = dims.slices() * mq;
    Team::new(threads).for_each_init(
        tasks,
        || ForwardBuffers::new(bq, bk, dims),
        |buf, task| {
            forward_block(q, k, v, out, lse, (plan, key_valid), (scale, precision), dims, task, buf);
            Ok(())
        },
    )
}

struct ForwardBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    state: OnlineSoftmax,
}

impl ForwardBuffers {
    fn new(bq: usize, bk: usize, dims: Dims) -> Result<Self, ViewError> {
        let panel = bk.max(PANEL_KEYS);
        Ok(ForwardBuffers {
            q: zeros(alloc::size(&[bq, dims.d])?)?,
            k: zeros(alloc::size(&[panel, dims.d])?)?,
            v: zeros(alloc::size(&[panel, dims.dv])?)?,
            s: zeros(alloc::size(&[bq, panel])?)?,
            state: OnlineSoftmax::new(bq, dims.dv)?,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_block(q: &View, k: &View, v: &View, out: &View, lse: &View, masks: (&BlockPlan, Option<&[i32]>),
                 (scale, precision): (f32, Precision), dims: Dims, task: usize, buf: &mut ForwardBuffers) {
    let (plan, key_valid) = masks;
    let mq = plan.num_query_blocks();
    let (bh, i) = (task / mq, task % mq);
    let (b, h) = dims.slice(bh);
    let (q0, lq) = plan.q_block(i);
    let (d, dv) = (dims.d, dims.dv);
    // bf16 products take q as it is (exact in bf16) and scale the logits instead.
    let q_mul = if precision.is_bf16() { 1.0 } else { scale * LOG2_E };
    gather(q, (b, h), plan.q_perm()[q0..q0 + lq].iter().copied(), q_mul, &mut buf.q);
    buf.state.reset(lq);
    let mut entries = plan.indptr()[i]..plan.indptr()[i + 1];
    while !entries.is_empty() {
        // A panel: consecutive entries gathered side by side, up to PANEL_KEYS keys (or one block).
        let first = entries.start;
        let mut lk = 0;
        while let Some(e) = entries.clone().next() {
            let (k0, len) = plan.k_block(plan.indices()[e]);
            if lk > 0 && lk + len > PANEL_KEYS {
                break;
            }
            let keys = &plan.k_perm()[k0..k0 + len];
            gather(k, (b, h), keys.iter().copied(), 1.0, &mut buf.k[lk * d..]);
            gather(v, (b, h), keys.iter().copied(), 1.0, &mut buf.v[lk * dv..]);
            lk += len;
            entries.start += 1;
        }
        let s = &mut buf.s[..lq * lk];
        // s = q · kᵀ (panels hold at most max(PANEL_KEYS, largest key block) keys: the buffers' sizes)
        Gemm { m: lq, n: lk, k: d, accumulate: false }.run_in(precision, MatMut::rows(s, lk), Mat::rows(&buf.q, d), Mat::rows(&buf.k, d).t());
        if precision.is_bf16() {
            vmath::scale(s, scale * LOG2_E);
        }
        let mut column = 0;
        for e in first..entries.start {
            let (k0, len) = plan.k_block(plan.indices()[e]);
            if plan.kinds()[e] == MASKED {
                apply_mask(plan, key_valid, b, q0, k0, lq, len, &mut s[column..], lk);
            }
            column += len;
        }
        buf.state.update(s, lq, lk, 1.0, |_, _, _, _| {});
        // acc += p · v
        Gemm { m: lq, n: dv, k: lk, accumulate: true }.run_in(precision, MatMut::rows(&mut buf.state.acc, dv), Mat::rows(s, lk), Mat::rows(&buf.v, dv));
    }
    let st = &mut buf.state;
    for r in 0..lq {
        let inv = st.inverse(r);
        let log_den = st.log_denominator(r);
        let row = &mut st.acc[r * dv..(r + 1) * dv];
        vmath::scale(row, inv);
        let token = plan.q_perm()[q0 + r];
        // SAFETY: `out` and `lse` are validated contiguous outputs and q_perm is a permutation, so this task (query
        // block i of slice bh) is the only one touching row `token` of either.
        unsafe {
            out.store_row(&[b, h, token], row);
            lse.store_f32(&[b, h, token], log_den);
        }
    }
}

/// Backward: given `dout (B, H, Nq, Dv)`, `lse` and `delta = rowsum(dout ∘ out)` (both `(B, H, Nq)` f32),
/// writes `dq`, `dk`, `dv` (contiguous, q's dtype).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &View,
    k: &View,
    v: &View,
    dout: &View,
    lse: &View,
    delta: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    plan: &BlockPlan,
    key_valid: Option<&[i32]>,
    scale: f32,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check_inputs(q, k, v, plan, key_valid)?;
    let (bh, nq, nk) = ([dims.batch, dims.heads], dims.n, plan.k_perm().len());
    check_input(dout, &[bh[0], bh[1], nq, dims.dv], None)?;
    check_input(lse, &[bh[0], bh[1], nq], DType::F32)?;
    check_input(delta, &[bh[0], bh[1], nq], DType::F32)?;
    check_output(dq, &[bh[0], bh[1], nq, dims.d], q.dtype())?;
    check_output(dk, &[bh[0], bh[1], nk, dims.d], q.dtype())?;
    check_output(dv, &[bh[0], bh[1], nk, dims.dv], q.dtype())?;
    let (bq, bk) = (plan.max_q_block(), plan.max_k_block());
    let team = Team::new(threads);
    let (mq, mk) = (plan.num_query_blocks(), plan.num_key_blocks());
    let precision = Precision::for_inputs(q.dtype(), active_isa()?);
    let ctx = BackwardCtx { q, k, v, dout, lse, delta, plan, key_valid, scale, dims, precision };
    let slices = dims.slices();
    if slices >= SLICES_PER_THREAD * team.threads() {
        // Enough slices to keep every thread busy: one pass per slice, which owns its dq rows.
        return team.for_each_init(
            slices,
            || Ok((BackwardBuffers::new(bq, bk, dims)?, Vec::new())),
            |(buf, dq_acc), bh| ctx.slice_backward(dq, dk, dv, bh, buf, dq_acc),
        );
    }
    let buffers = || BackwardBuffers::new(bq, bk, dims);
    team.for_each_init(slices * mq, buffers, |buf, task| {
        ctx.dq_block(dq, task, buf);
        Ok(())
    })?;
    team.for_each_init(slices * mk, buffers, |buf, task| {
        ctx.dkv_block(dk, dv, task, buf);
        Ok(())
    })
}

struct BackwardCtx<'a> {
    q: &'a View,
    k: &'a View,
    v: &'a View,
    dout: &'a View,
    lse: &'a View,
    delta: &'a View,
    plan: &'a BlockPlan,
    key_valid: Option<&'a [i32]>,
    scale: f32,
    dims: Dims,
    precision: Precision,
}

struct BackwardBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    acc_a: Vec<f32>,
    acc_b: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
}

impl BackwardBuffers {
    fn new(bq: usize, bk: usize, dims: Dims) -> Result<Self, ViewError> {
        let rows = bq.max(bk);
        let buf = |rows: usize, cols: usize| -> Result<Vec<f32>, ViewError> { zeros(alloc::size(&[rows, cols])?) };
        Ok(BackwardBuffers {
            q: buf(bq, dims.d)?,
            k: buf(bk, dims.d)?,
            v: buf(bk, dims.dv)?,
            dout: buf(bq, dims.dv)?,
            p: buf(bq, bk)?,
            dp: buf(bq, bk)?,
            acc_a: buf(rows, dims.d)?,
            acc_b: buf(rows, dims.dv)?,
            lse: zeros(bq)?,
            delta: zeros(bq)?,
        })
    }
}

impl BackwardCtx<'_> {
    /// Loads the query side of block `i` (q scaled by `scale·log2 e`, dout, lse in base 2, delta).
    fn load_query_block(&self, b: usize, h: usize, i: usize, buf: &mut BackwardBuffers) -> (usize, usize) {
        let plan = self.plan;
        let (q0, lq) = plan.q_block(i);
        let tokens = &plan.q_perm()[q0..q0 + lq];
        gather(self.q, (b, h), tokens.iter().copied(), 1.0, &mut buf.q);
        gather(self.dout, (b, h), tokens.iter().copied(), 1.0, &mut buf.dout);
        for (r, &token) in tokens.iter().enumerate() {
            buf.lse[r] = self.lse.load(&[b, h, token]) * LOG2_E;
            buf.delta[r] = self.delta.load(&[b, h, token]);
        }
        (q0, lq)
    }

    fn load_key_block(&self, b: usize, h: usize, j: usize, buf: &mut BackwardBuffers) -> (usize, usize) {
        let (k0, lk) = self.plan.k_block(j);
        let tokens = &self.plan.k_perm()[k0..k0 + lk];
        gather(self.k, (b, h), tokens.iter().copied(), 1.0, &mut buf.k);
        gather(self.v, (b, h), tokens.iter().copied(), 1.0, &mut buf.v);
        (k0, lk)
    }

    /// P = softmax probabilities and dS = P ∘ (dout·vᵀ − delta) for the loaded block pair (into `p`, `dp`).
    fn probabilities(&self, b: usize, q0: usize, lq: usize, k0: usize, lk: usize, kind: u8, buf: &mut BackwardBuffers) {
        let (d, dv) = (self.dims.d, self.dims.dv);
        let (p, dp) = (&mut buf.p[..lq * lk], &mut buf.dp[..lq * lk]);
        // p = q · kᵀ ; dp = dout · vᵀ
        Gemm { m: lq, n: lk, k: d, accumulate: false }.run_in(self.precision, MatMut::rows(p, lk), Mat::rows(&buf.q, d), Mat::rows(&buf.k, d).t());
        Gemm { m: lq, n: lk, k: dv, accumulate: false }.run_in(self.precision, MatMut::rows(dp, lk), Mat::rows(&buf.dout, dv), Mat::rows(&buf.v, dv).t());
        if kind == MASKED {
            apply_mask(self.plan, self.key_valid, b, q0, k0, lq, lk, p, lk);
        }
        let mul = self.scale * LOG2_E;
        for r in 0..lq {
            let row = &mut p[r * lk..(r + 1) * lk];
            if buf.lse[r] == f32::NEG_INFINITY {
                row.fill(0.0);
            } else {
                vmath::exp2_affine(row, mul, &[], buf.lse[r]);
            }
            vmath::softmax_grad(&mut dp[r * lk..(r + 1) * lk], row, buf.delta[r]);
        }
    }

    fn dq_block(&self, dq: &View, task: usize, buf: &mut BackwardBuffers) {
        let (plan, d) = (self.plan, self.dims.d);
        let mq = plan.num_query_blocks();
        let (bh, i) = (task / mq, task % mq);
        let (b, h) = self.dims.slice(bh);
        let (q0, lq) = self.load_query_block(b, h, i, buf);
        buf.acc_a[..lq * d].fill(0.0);
        for e in plan.indptr()[i]..plan.indptr()[i + 1] {
            let (k0, lk) = self.load_key_block(b, h, plan.indices()[e], buf);
            self.probabilities(b, q0, lq, k0, lk, plan.kinds()[e], buf);
            // dq += dS · k
            Gemm { m: lq, n: d, k: lk, accumulate: true }.run_in(self.precision, MatMut::rows(&mut buf.acc_a, d), Mat::rows(&buf.dp, lk), Mat::rows(&buf.k, d));
        }
        for r in 0..lq {
            let row = &mut buf.acc_a[r * d..(r + 1) * d];
            row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: `dq` is a validated contiguous output and q_perm is a permutation, so this task (query block i
            // of slice bh) is the only one touching this row.
            unsafe { dq.store_row(&[b, h, plan.q_perm()[q0 + r]], row) };
        }
    }

    fn dkv_block(&self, dk: &View, dv_out: &View, task: usize, buf: &mut BackwardBuffers) {
        let mk = self.plan.num_key_blocks();
        let (bh, j) = (task / mk, task % mk);
        self.key_block(dk, dv_out, bh, j, buf, None);
    }

    /// dk, dv of key block `j` of slice `bh` over the query blocks listing it, written out; with `dq_acc` (the
    /// slice's dq rows in query layout order, f32, unscaled) also adds `dS · k` to the rows of every query block.
    fn key_block(&self, dk: &View, dv_out: &View, bh: usize, j: usize, buf: &mut BackwardBuffers,
                 mut dq_acc: Option<&mut [f32]>) {
        let (plan, d, dv) = (self.plan, self.dims.d, self.dims.dv);
        let (b, h) = self.dims.slice(bh);
        let (k0, lk) = self.load_key_block(b, h, j, buf);
        buf.acc_a[..lk * d].fill(0.0);
        buf.acc_b[..lk * dv].fill(0.0);
        for e in plan.t_indptr()[j]..plan.t_indptr()[j + 1] {
            let (q0, lq) = self.load_query_block(b, h, plan.t_indices()[e], buf);
            self.probabilities(b, q0, lq, k0, lk, plan.t_kinds()[e], buf);
            // dv += Pᵀ · dout ; dk += dSᵀ · q
            Gemm { m: lk, n: dv, k: lq, accumulate: true }.run_in(self.precision, MatMut::rows(&mut buf.acc_b, dv), Mat::rows(&buf.p, lk).t(), Mat::rows(&buf.dout, dv));
            Gemm { m: lk, n: d, k: lq, accumulate: true }.run_in(self.precision, MatMut::rows(&mut buf.acc_a, d), Mat::rows(&buf.dp, lk).t(), Mat::rows(&buf.q, d));
            if let Some(acc) = dq_acc.as_deref_mut() {
                // dq += dS · k (the slice's dq rows in query layout order)
                let rows = &mut acc[q0 * d..(q0 + lq) * d];
                Gemm { m: lq, n: d, k: lk, accumulate: true }.run_in(self.precision, MatMut::rows(rows, d), Mat::rows(&buf.dp, lk), Mat::rows(&buf.k, d));
            }
        }
        for r in 0..lk {
            let token = plan.k_perm()[k0 + r];
            let dk_row = &mut buf.acc_a[r * d..(r + 1) * d];
            dk_row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: `dk`, `dv` are validated contiguous outputs and k_perm is a permutation, so this task (key block
            // j of slice bh) is the only one touching row `token` of either.
            unsafe {
                dk.store_row(&[b, h, token], dk_row);
                dv_out.store_row(&[b, h, token], &buf.acc_b[r * dv..(r + 1) * dv]);
            }
        }
    }

    /// The whole backward of slice `bh` in one pass over its key blocks (5 GEMMs per block pair instead of the
    /// two-pass 7): the task owns every dq row of the slice, accumulated in `dq_acc` and written at the end.
    fn slice_backward(&self, dq: &View, dk: &View, dv_out: &View, bh: usize, buf: &mut BackwardBuffers,
                      dq_acc: &mut Vec<f32>) -> Result<(), ViewError> {
        let (plan, d) = (self.plan, self.dims.d);
        let nq = plan.q_perm().len();
        dq_acc.clear();
        alloc::resize(dq_acc, nq * d, 0.0)?;
        for j in 0..plan.num_key_blocks() {
            self.key_block(dk, dv_out, bh, j, buf, Some(dq_acc.as_mut_slice()));
        }
        let (b, h) = self.dims.slice(bh);
        for (position, row) in dq_acc.chunks_exact_mut(d).enumerate() {
            row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: `dq` is a validated contiguous output, q_perm is a permutation and this task owns slice bh, so
            // it is the only one touching this row.
            unsafe { dq.store_row(&[b, h, plan.q_perm()[position]], row) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
