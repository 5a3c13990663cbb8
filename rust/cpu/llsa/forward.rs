//! LLSA forward: one task per group of sibling query blocks; the group's pooled logits are one GEMM, each query
//! block adds its fine logits, and every query row gets one softmax over both (its whole key set fits in memory).

use super::fine;
use super::{gather_rows, Inputs, KeyRows, Plan};
use crate::alloc;
use crate::cpu::common::{check_output, zeros, Dims, LN_2, LOG2_E};
use crate::cpu::isa::Isa;
use crate::cpu::matmul::{Gemm, Mat, MatMut, Precision};
use crate::cpu::parallel::Team;
use crate::cpu::view::{DType, View, ViewError};
use crate::cpu::vmath::{self, exp2_shift_sum};

/// Bytes of the per-worker f32 copies of one slice's keys and values (all workers together) up to which the
/// forward reads fine blocks from them; above it each block is gathered from k and v (no copy of the slice). The
/// Rust unit tests take the gathers (the Python tests the copies).
const SLICE_COPY_BYTES: usize = 256 << 20;

/// Writes `out (B, H, N, Dv)` (q's dtype, contiguous) and `lse (B, H, N)` (f32, natural log of the softmax
/// denominator of `scale·q·k + ln(count)`).
pub fn forward(inp: &Inputs, out: &View, lse: &View, plan: &Plan, scale: f32, threads: usize) -> Result<(), ViewError> {
    let dims = inp.dims(plan)?;
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], inp.q.dtype())?;
    check_output(lse, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for bh in 0..plan.batch_heads {
        alloc::extend(&mut tasks, plan.groups(bh)?.into_iter().map(|(j0, j1)| (bh, j0, j1)))?;
    }
    let isa = Isa::current();
    let precision = Precision::for_inputs(inp.q.dtype(), isa);
    let copy_bytes = alloc::size(&[plan.n, dims.d + dims.dv, 4, threads.max(1)]).unwrap_or(usize::MAX);
    let copy_slices = !cfg!(test) && copy_bytes <= SLICE_COPY_BYTES;
    Team::new(threads).for_each_init(
        tasks.len(),
        || Buffers::new(plan, dims, copy_slices),
        |buf, task| {
            let (bh, j0, j1) = tasks[task];
            forward_group(inp, out, lse, plan, dims, (scale, isa, precision), bh, (j0, j1), buf);
            Ok(())
        },
    )
}

struct Buffers {
    /// With `SLICE_COPY_BYTES` room, the fine keys and values of slice `slice.0` in f32 and internal order (row
    /// `r` = token `plan.row(r)`), loaded once per slice a worker meets: the per-block gathers then copy
    /// contiguous runs (for bf16 inputs, converted once rather than once per selection). Empty otherwise.
    slice: (Option<usize>, Vec<f32>, Vec<f32>),
    q: Vec<f32>,
    pooled: KeyRows,
    fine: KeyRows,
    /// With the slice copy and f32 products: the selected fine blocks of a query block, and the lane kernels'
    /// buffers (they read the blocks in place, `fine`).
    blocks: Vec<(usize, usize)>,
    lanes: fine::Scratch,
    sp: Vec<f32>,
    sf: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Buffers {
    fn new(plan: &Plan, dims: Dims, copy_slices: bool) -> Result<Self, ViewError> {
        let rows = plan.max_group() * plan.block_rows();
        let (rp, rf) = (plan.max_pooled_rows(), plan.max_fine_rows());
        Ok(Buffers {
            slice: if copy_slices {
                (None, zeros(alloc::size(&[plan.n, dims.d])?)?, zeros(alloc::size(&[plan.n, dims.dv])?)?)
            } else {
                (None, Vec::new(), Vec::new())
            },
            q: zeros(rows * dims.d)?,
            pooled: KeyRows::new(rp, dims.d, dims.dv)?,
            fine: KeyRows::new(rf, dims.d, dims.dv)?,
            blocks: zeros(plan.k_fine)?,
            lanes: fine::Scratch::new(dims.d, dims.dv, rf)?,
            sp: zeros(rows * rp)?,
            sf: zeros(plan.block_rows() * rf)?,
            acc: zeros(rows * dims.dv)?,
            m: zeros(rows)?,
            l: zeros(rows)?,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_group(
    inp: &Inputs,
    out: &View,
    lse: &View,
    plan: &Plan,
    dims: Dims,
    (scale, isa, precision): (f32, Isa, Precision),
    bh: usize,
    (j0, j1): (usize, usize),
    buf: &mut Buffers,
) {
    let ((b, h), d, dv) = (dims.slice(bh), dims.d, dims.dv);
    let row0 = j0 * plan.block;
    let rows = (j1 * plan.block).min(plan.n) - row0;
    // bf16 products take q as it is (exact in bf16) and scale the logits instead (`logit_mul`).
    let (q_mul, logit_mul) = if precision.is_bf16() { (1.0, scale * LOG2_E) } else { (scale * LOG2_E, 1.0) };
    gather_rows(inp.q, plan, (b, h), (row0, rows), q_mul, &mut buf.q);
    buf.pooled.gather_pooled(inp, plan, dims, b, h, plan.pooled_ids(bh, j0));
    let rp = buf.pooled.len;
    let sp = &mut buf.sp[..rows * rp];
    // sp = q · kpᵀ + bias over the group's rows
    Gemm { m: rows, n: rp, k: d, accumulate: false }.run_in(precision, MatMut::rows(sp, rp), Mat::rows(&buf.q, d), Mat::rows(&buf.pooled.k, d).t());
    for row in sp.chunks_exact_mut(rp) {
        if logit_mul != 1.0 {
            vmath::scale(row, logit_mul);
        }
        vmath::add_scaled(row, &buf.pooled.bias[..rp], 1.0);
    }
    let (loaded, slice_k, slice_v) = &mut buf.slice;
    let in_order = !slice_k.is_empty();
    if in_order && *loaded != Some(bh) {
        inp.k.load_rows(&[b, h], (0..plan.n).map(|r| plan.row(r)), slice_k);
        inp.v.load_rows(&[b, h], (0..plan.n).map(|r| plan.row(r)), slice_v);
        *loaded = Some(bh);
    }
    // f32 products on the slice copy: the lane kernels read the selected blocks in place.
    let on_lanes = in_order && !precision.is_bf16();
    for j in j0..j1 {
        let r0 = (j - j0) * plan.block;
        let lq = plan.fine_block(j).1;
        if on_lanes {
            buf.blocks.clear();
            buf.blocks.extend(plan.fine_ids(bh, j).iter().map(|&p| plan.fine_block(p as usize)));
            let fine = fine::Fine { q: &buf.q[r0 * d..], d, keys: &buf.slice.1, values: &buf.slice.2, dv, blocks: &buf.blocks };
            let pooled = fine::Pooled { logits: &mut sp[r0 * rp..(r0 + lq) * rp], rp };
            let rows = fine::Rows { acc: &mut buf.acc[r0 * dv..(r0 + lq) * dv], m: &mut buf.m[r0..r0 + lq], l: &mut buf.l[r0..r0 + lq] };
            fine::attend(isa, fine, pooled, rows, &mut buf.lanes);
            continue;
        }
        if in_order {
            buf.fine.gather_fine_in_order((&buf.slice.1, &buf.slice.2), plan, dims, plan.fine_ids(bh, j));
        } else {
            buf.fine.gather_fine(inp, plan, dims, b, h, plan.fine_ids(bh, j));
        }
        let rf = buf.fine.len;
        let sf = &mut buf.sf[..lq * rf];
        // sf = q · kᵀ over query block j's rows and its fine keys
        Gemm { m: lq, n: rf, k: d, accumulate: false }.run_in(precision, MatMut::rows(sf, rf), Mat::rows(&buf.q[r0 * d..], d), Mat::rows(&buf.fine.k, d).t());
        if logit_mul != 1.0 {
            vmath::scale(sf, logit_mul);
        }
        for r in 0..lq {
            let fine_row = &mut sf[r * rf..(r + 1) * rf];
            let pooled_row = &mut sp[(r0 + r) * rp..(r0 + r + 1) * rp];
            let m = vmath::max(fine_row).max(vmath::max(pooled_row));
            buf.l[r0 + r] = exp2_shift_sum(fine_row, m) + exp2_shift_sum(pooled_row, m);
            buf.m[r0 + r] = m;
        }
        // acc = p · v over the fine keys
        Gemm { m: lq, n: dv, k: rf, accumulate: false }.run_in(precision, MatMut::rows(&mut buf.acc[r0 * dv..], dv), Mat::rows(sf, rf), Mat::rows(&buf.fine.v, dv));
    }
    // acc += p · vp over the pooled keys
    Gemm { m: rows, n: dv, k: rp, accumulate: true }.run_in(precision, MatMut::rows(&mut buf.acc, dv), Mat::rows(sp, rp), Mat::rows(&buf.pooled.v, dv));
    for r in 0..rows {
        let row = &mut buf.acc[r * dv..(r + 1) * dv];
        vmath::scale(row, 1.0 / buf.l[r]);
        let log_den = (buf.m[r] + buf.l[r].log2()) * LN_2;
        // SAFETY: `out`, `lse` are validated contiguous outputs; groups partition the query rows of (b, h) and
        // `plan.row` is a permutation, so this task is the only one touching these rows.
        unsafe {
            out.store_row(&[b, h, plan.row(row0 + r)], row);
            lse.store_f32(&[b, h, row0 + r], log_den);
        }
    }
}
