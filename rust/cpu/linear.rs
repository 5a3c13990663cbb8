//! Linear-attention kernels on CPU (DyDiLA, LiT): the non-causal core `S = (1/N) Σ_n K̂_nᵀ V_n` (f32,
//! `D x Dv`), `O = Q̂ S` (divided by `Q̂ · mean(K̂) + eps` when normalising), forward and backward, over feature rows
//! that are either the inputs (linear attention) or DyDiLA's prologue (`features`).
//!
//! Layouts: q, k, q_aux, k_aux `(B, H, N, D)`, v `(B, H, N, Dv)`, per-token parameters `(B, H, N)`; any strides,
//! f32/f16/bf16, f32 accumulation. Work runs on a dedicated pool in blocks of `BLOCK` tokens through the `gemm`
//! crate: the state reduction over `(b, h, token split)` tasks (the token range is split when `B·H` is small and the
//! partial states are summed), the readout over `(b, h, token block)` tasks. The backward mirrors it: a query pass
//! (`dQ̂`, and the partial `dS`, `dm` it reduces) and a key pass (`dK̂`, `dV`). Every token row is written by one task.

mod features;
mod power;

use rayon::prelude::*;

pub use features::{Dydila, Plain, Stream, StreamGrads};
use features::{load_rows, output_rows, rows_in_shape, store_rows, FeatureMap, Rows, Side};

use super::pool::pool;
use super::simd::matmul;
use super::vmath;
use super::view::{err, DType, View, ViewError};

/// Tokens per GEMM block.
const BLOCK: usize = 128;
/// Fewest tokens per split of the state reduction (keeps the sum of partial states negligible).
const MIN_SPLIT_TOKENS: usize = 1024;
/// Tasks per worker the state reduction aims for when it splits tokens.
const TASKS_PER_THREAD: usize = 4;

/// Options of the core.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub normalize: bool,
    pub eps: f32,
}

/// DyDiLA's inputs: `[q side, k side]` streams and v.
pub struct DydilaInputs<'a> {
    pub q: Stream<'a>,
    pub k: Stream<'a>,
    pub v: &'a View,
}

/// DyDiLA's gradient outputs.
pub struct DydilaGrads<'a> {
    pub q: StreamGrads<'a>,
    pub k: StreamGrads<'a>,
    pub dv: &'a View,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    fn bh(&self) -> usize {
        self.batch * self.heads
    }

    /// f32 values of one head's state: `S` (`d x dv`) then `m = mean K̂` (`d`).
    fn width(&self) -> usize {
        self.d * self.dv + self.d
    }

    fn head(&self, bh: usize) -> (usize, usize) {
        (bh / self.heads, bh % self.heads)
    }

    fn blocks(&self) -> usize {
        self.n.div_ceil(BLOCK)
    }

    /// Token splits of the state reduction: enough tasks for every worker, never below `MIN_SPLIT_TOKENS` each.
    fn splits(&self, threads: usize) -> usize {
        let wanted = (TASKS_PER_THREAD * threads.max(1)).div_ceil(self.bh());
        wanted.clamp(1, self.n.div_ceil(MIN_SPLIT_TOKENS).max(1))
    }

    /// Token range of split `s` of `splits` (whole blocks).
    fn split_range(&self, s: usize, splits: usize) -> (usize, usize) {
        let per = self.blocks().div_ceil(splits) * BLOCK;
        ((s * per).min(self.n), ((s + 1) * per).min(self.n))
    }
}

// ------------------------------------------------------------------------------------------------ GEMM operands

/// A GEMM input: `(pointer, row stride, column stride)`, in f32 elements.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// Rows of a `(B, H, N, W)` view as a GEMM input: in place when the view is f32 (any strides), else converted into
/// `buf` (`rows.len x W`).
fn input_rows(view: &View, rows: Rows, buf: &mut [f32]) -> Operand {
    if view.dtype == DType::F32 && rows_in_shape(view, rows) {
        // SAFETY: validated view and an index inside its shape: the offset is inside the tensor.
        let ptr = unsafe { (view.ptr as *const f32).add(view.offset(&[rows.b, rows.h, rows.n0, 0])) };
        return Operand { ptr, rs: view.strides[2], cs: view.strides[3] };
    }
    load_rows(view, rows, buf);
    Operand { ptr: buf.as_ptr(), rs: view.shape[3], cs: 1 }
}

// ------------------------------------------------------------------------------------------------ validation

fn check_qkv(q: &View, k: &View, v: &View) -> Result<Dims, ViewError> {
    for t in [q, k, v] {
        t.expect(4, true)?;
        if t.dtype != q.dtype {
            return err(format!("{}: dtype {:?} differs from q's {:?}", t.name, t.dtype, q.dtype));
        }
    }
    let [batch, heads, n, d] = q.shape[..] else { unreachable!("4 dims checked") };
    let dv = v.shape[3];
    if k.shape != q.shape || v.shape[..3] != q.shape[..3] {
        return err(format!("shapes disagree: q {:?}, k {:?}, v {:?}", q.shape, k.shape, v.shape));
    }
    if batch * heads * n * d * dv == 0 {
        return err(format!("empty input: q {:?}, v {:?}", q.shape, v.shape));
    }
    Ok(Dims { batch, heads, n, d, dv })
}

fn check_like(t: &View, like: &View) -> Result<(), ViewError> {
    t.expect(4, true)?;
    if t.shape != like.shape || t.dtype != like.dtype {
        let (name, want) = (t.name, like.name);
        return err(format!("{name}: expected shape {:?} and dtype {:?} like {want}, got {:?} {:?}", like.shape, like.dtype, t.shape, t.dtype));
    }
    Ok(())
}

fn check_per_token(t: &View, dims: Dims) -> Result<(), ViewError> {
    t.expect(3, true)?;
    if t.shape != [dims.batch, dims.heads, dims.n] {
        return err(format!("{}: expected shape {:?}, got {:?}", t.name, [dims.batch, dims.heads, dims.n], t.shape));
    }
    Ok(())
}

fn check_output(t: &View, shape: &[usize], dtype: DType) -> Result<(), ViewError> {
    if t.shape != shape || t.dtype != dtype {
        return err(format!("{}: expected shape {shape:?} and dtype {dtype:?}, got {:?} {:?}", t.name, t.shape, t.dtype));
    }
    t.expect_contiguous()
}

fn check_options(opts: Options) -> Result<(), ViewError> {
    if !(opts.eps.is_finite() && opts.eps > 0.0) {
        return err(format!("eps must be finite and > 0, got {}", opts.eps));
    }
    Ok(())
}

/// The state views: `state (B, H, D, Dv)` and `ksum (B, H, D)`, f32 (outputs: also contiguous).
fn check_state(state: &View, ksum: &View, dims: Dims, output: bool) -> Result<(), ViewError> {
    let shapes: [(&View, Vec<usize>); 2] = [
        (state, vec![dims.batch, dims.heads, dims.d, dims.dv]),
        (ksum, vec![dims.batch, dims.heads, dims.d]),
    ];
    for (t, shape) in shapes {
        if output {
            check_output(t, &shape, DType::F32)?;
        } else if t.shape != shape || t.dtype != DType::F32 {
            return err(format!("{}: expected f32 of shape {shape:?}, got {:?} {:?}", t.name, t.dtype, t.shape));
        }
    }
    Ok(())
}

fn check_dout(dout: &View, dims: Dims) -> Result<(), ViewError> {
    dout.expect(4, true)?;
    if dout.shape != [dims.batch, dims.heads, dims.n, dims.dv] {
        return err(format!("dout: expected shape {:?}, got {:?}", [dims.batch, dims.heads, dims.n, dims.dv], dout.shape));
    }
    Ok(())
}

fn check_stream(s: &Stream, q: &View, dims: Dims) -> Result<(), ViewError> {
    check_like(s.z, q)?;
    check_like(s.z_aux, q)?;
    for t in [s.gamma, s.gamma_aux, s.lambda] {
        check_per_token(t, dims)?;
    }
    Ok(())
}

fn check_stream_grads(g: &StreamGrads, like: &View, dims: Dims) -> Result<(), ViewError> {
    check_output(g.dz, &like.shape, like.dtype)?;
    check_output(g.dz_aux, &like.shape, like.dtype)?;
    for t in [g.dgamma, g.dgamma_aux, g.dlambda] {
        check_output(t, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------ public API

/// Linear attention forward: writes `out (B, H, N, Dv)` (q's dtype), `state = (1/N) Σ kᵀv` and `ksum = mean k`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    state: &View,
    ksum: &View,
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check_qkv(q, k, v)?;
    check_options(opts)?;
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], q.dtype)?;
    check_state(state, ksum, dims, true)?;
    forward(&Plain { inputs: [q, k], grads: None }, v, out, state, ksum, dims, opts, threads)
}

/// Linear attention backward from the forward's `state` and `ksum`: writes `dq`, `dk`, `dv` (q's dtype).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    q: &View,
    k: &View,
    v: &View,
    state: &View,
    ksum: &View,
    dout: &View,
    grads: [&View; 3],
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check_qkv(q, k, v)?;
    check_options(opts)?;
    check_state(state, ksum, dims, false)?;
    check_dout(dout, dims)?;
    let [dq, dk, dv] = grads;
    check_output(dq, &q.shape, q.dtype)?;
    check_output(dk, &k.shape, q.dtype)?;
    check_output(dv, &v.shape, q.dtype)?;
    let f = Plain { inputs: [q, k], grads: Some([dq, dk]) };
    backward(&f, v, state, ksum, dout, dv, dims, opts, threads)
}

fn check_dydila(x: &DydilaInputs) -> Result<Dims, ViewError> {
    let dims = check_qkv(x.q.z, x.k.z, x.v)?;
    check_stream(&x.q, x.q.z, dims)?;
    check_stream(&x.k, x.q.z, dims)?;
    Ok(dims)
}

/// DyDiLA forward: prologue (power maps, differential) fused into the linear core; writes `out`, `state`, `ksum`
/// (of `K̂`).
pub fn dydila_forward(
    x: &DydilaInputs,
    out: &View,
    state: &View,
    ksum: &View,
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check_dydila(x)?;
    check_options(opts)?;
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], x.q.z.dtype)?;
    check_state(state, ksum, dims, true)?;
    let f = Dydila { sides: [x.q, x.k], grads: None, eps: opts.eps };
    forward(&f, x.v, out, state, ksum, dims, opts, threads)
}

/// DyDiLA backward: gradients of every input (q, k, v, q_aux, k_aux in q's dtype; γ's and λ's as f32).
#[allow(clippy::too_many_arguments)]
pub fn dydila_backward(
    x: &DydilaInputs,
    state: &View,
    ksum: &View,
    dout: &View,
    grads: DydilaGrads,
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check_dydila(x)?;
    check_options(opts)?;
    check_state(state, ksum, dims, false)?;
    check_dout(dout, dims)?;
    check_stream_grads(&grads.q, x.q.z, dims)?;
    check_stream_grads(&grads.k, x.q.z, dims)?;
    check_output(grads.dv, &x.v.shape, x.q.z.dtype)?;
    let f = Dydila { sides: [x.q, x.k], grads: Some([grads.q, grads.k]), eps: opts.eps };
    backward(&f, x.v, state, ksum, dout, grads.dv, dims, opts, threads)
}

// ------------------------------------------------------------------------------------------------ forward

#[allow(clippy::too_many_arguments)]
fn forward<F: FeatureMap>(
    f: &F,
    v: &View,
    out: &View,
    state: &View,
    ksum: &View,
    dims: Dims,
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let pool = pool(threads).map_err(ViewError)?;
    pool.install(|| {
        let states = reduce_state(f, v, dims, dims.splits(threads));
        write_states(&states, state, ksum, dims);
        readout(f, out, &states, dims, opts);
    });
    Ok(())
}

/// Sums `partial` (`bh x splits` slots of `width`) over the splits, times `scale`: `bh` slots.
fn sum_splits(partial: &[f32], dims: Dims, splits: usize, scale: f32) -> Vec<f32> {
    let width = dims.width();
    let mut total = vec![0.0f32; dims.bh() * width];
    total.par_chunks_mut(width).enumerate().for_each(|(bh, t)| {
        for part in partial[bh * splits * width..(bh + 1) * splits * width].chunks_exact(width) {
            t.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        t.iter_mut().for_each(|a| *a *= scale);
    });
    total
}

/// `[S | m]` per head: `S = (1/N) Σ K̂ᵀ V`, `m = (1/N) Σ K̂`.
fn reduce_state<F: FeatureMap>(f: &F, v: &View, dims: Dims, splits: usize) -> Vec<f32> {
    let (d, dv, width) = (dims.d, dims.dv, dims.width());
    let mut partial = vec![0.0f32; dims.bh() * splits * width];
    partial.par_chunks_mut(width).enumerate().for_each_init(
        || (vec![0.0f32; BLOCK * d], vec![0.0f32; BLOCK * dv], f.scratch(BLOCK)),
        |(kb, vb, scratch), (task, acc)| {
            let (b, h) = dims.head(task / splits);
            let (start, end) = dims.split_range(task % splits, splits);
            let (s, m) = acc.split_at_mut(d * dv);
            for n0 in (start..end).step_by(BLOCK) {
                let rows = Rows { b, h, n0, len: (end - n0).min(BLOCK) };
                f.load(Side::Key, rows, kb, scratch);
                let vr = input_rows(v, rows, vb);
                // SAFETY: kb holds len x d, vr addresses len x dv, s is d x dv (row-major), no overlap.
                unsafe { matmul(d, dv, rows.len, s.as_mut_ptr(), dv, true, kb.as_ptr(), 1, d, vr.ptr, vr.rs, vr.cs) };
                for row in kb[..rows.len * d].chunks_exact(d) {
                    m.iter_mut().zip(row).for_each(|(a, x)| *a += x);
                }
            }
        },
    );
    sum_splits(&partial, dims, splits, 1.0 / dims.n as f32)
}

fn write_states(states: &[f32], state: &View, ksum: &View, dims: Dims) {
    let (d, dv) = (dims.d, dims.dv);
    for (bh, st) in states.chunks_exact(dims.width()).enumerate() {
        let (b, h) = dims.head(bh);
        for i in 0..d {
            // SAFETY: validated contiguous f32 outputs; only this thread writes them.
            unsafe { state.store_row(&[b, h, i], &st[i * dv..(i + 1) * dv]) };
        }
        unsafe { ksum.store_row(&[b, h], &st[d * dv..]) };
    }
}

fn readout<F: FeatureMap>(f: &F, out: &View, states: &[f32], dims: Dims, opts: Options) {
    let (d, dv) = (dims.d, dims.dv);
    (0..dims.bh() * dims.blocks()).into_par_iter().for_each_init(
        || (vec![0.0f32; BLOCK * d], vec![0.0f32; BLOCK * dv], f.scratch(BLOCK)),
        |(qb, ob, scratch), task| {
            let (bh, blk) = (task / dims.blocks(), task % dims.blocks());
            let (b, h) = dims.head(bh);
            let n0 = blk * BLOCK;
            let rows = Rows { b, h, n0, len: (dims.n - n0).min(BLOCK) };
            let (s, m) = states[bh * dims.width()..(bh + 1) * dims.width()].split_at(d * dv);
            f.load(Side::Query, rows, qb, scratch);
            // SAFETY: each (b, h, token block) belongs to one task.
            let (o, in_place) = unsafe { output_rows(out, rows, ob) };
            // SAFETY: qb holds len x d, s d x dv, o len x dv.
            unsafe { matmul(rows.len, dv, d, o.as_mut_ptr(), dv, false, qb.as_ptr(), d, 1, s.as_ptr(), dv, 1) };
            if opts.normalize {
                for (o, q) in o.chunks_exact_mut(dv).zip(qb.chunks_exact(d)) {
                    let inv = 1.0 / (vmath::dot(q, m) + opts.eps);
                    o.iter_mut().for_each(|x| *x *= inv);
                }
            }
            if !in_place {
                // SAFETY: as above.
                unsafe { store_rows(out, rows, o) };
            }
        },
    );
}

// ------------------------------------------------------------------------------------------------ backward

/// Reads `[S | m]` per head from the forward's outputs.
fn read_states(state: &View, ksum: &View, dims: Dims) -> Vec<f32> {
    let (d, dv) = (dims.d, dims.dv);
    let mut states = vec![0.0f32; dims.bh() * dims.width()];
    for (bh, st) in states.chunks_exact_mut(dims.width()).enumerate() {
        let (b, h) = dims.head(bh);
        for i in 0..d {
            state.load_row(&[b, h, i], &mut st[i * dv..(i + 1) * dv]);
        }
        ksum.load_row(&[b, h], &mut st[d * dv..]);
    }
    states
}

#[allow(clippy::too_many_arguments)]
fn backward<F: FeatureMap>(
    f: &F,
    v: &View,
    state: &View,
    ksum: &View,
    dout: &View,
    dv_out: &View,
    dims: Dims,
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let pool = pool(threads).map_err(ViewError)?;
    let states = read_states(state, ksum, dims);
    pool.install(|| {
        let dstates = query_pass(f, dout, &states, dims, opts, dims.splits(threads));
        key_pass(f, v, dv_out, &dstates, dims);
    });
    Ok(())
}

/// Per token block: `T = g Sᵀ`; without normalisation `dQ̂ = T`, else with `den = Q̂·m + eps`,
/// `dden = −(Q̂·T)/den²`: `dQ̂ = T/den + dden m`, `g ← g/den`, `dm += dden Q̂`; then `dS += Q̂ᵀ g`.
/// Writes the query-side input gradients; returns `[dS | dm] / N` per head, summed over the splits.
fn query_pass<F: FeatureMap>(f: &F, dout: &View, states: &[f32], dims: Dims, opts: Options, splits: usize) -> Vec<f32> {
    let (d, dv, width) = (dims.d, dims.dv, dims.width());
    let mut partial = vec![0.0f32; dims.bh() * splits * width];
    partial.par_chunks_mut(width).enumerate().for_each_init(
        || (vec![0.0f32; BLOCK * d], vec![0.0f32; BLOCK * dv], vec![0.0f32; BLOCK * d], f.scratch(BLOCK)),
        |(qb, gb, tb, scratch), (task, acc)| {
            let bh = task / splits;
            let (b, h) = dims.head(bh);
            let (start, end) = dims.split_range(task % splits, splits);
            let (s, m) = states[bh * width..(bh + 1) * width].split_at(d * dv);
            let (ds, dm) = acc.split_at_mut(d * dv);
            for n0 in (start..end).step_by(BLOCK) {
                let rows = Rows { b, h, n0, len: (end - n0).min(BLOCK) };
                f.load(Side::Query, rows, qb, scratch);
                // Normalising rescales g: then it needs a copy.
                let g = if opts.normalize {
                    load_rows(dout, rows, gb);
                    Operand { ptr: gb.as_ptr(), rs: dv, cs: 1 }
                } else {
                    input_rows(dout, rows, gb)
                };
                // SAFETY (all matmuls): buffers hold len x d / len x dv, g addresses len x dv; S and dS are d x dv
                // row-major.
                unsafe { matmul(rows.len, d, dv, tb.as_mut_ptr(), d, false, g.ptr, g.rs, g.cs, s.as_ptr(), 1, dv) };
                if opts.normalize {
                    let per_row = qb.chunks_exact(d).zip(tb.chunks_exact_mut(d)).zip(gb.chunks_exact_mut(dv));
                    for ((q, t), g) in per_row.take(rows.len) {
                        let inv = 1.0 / (vmath::dot(q, m) + opts.eps);
                        let dden = -vmath::dot(q, t) * inv * inv;
                        t.iter_mut().zip(m).for_each(|(x, mi)| *x = *x * inv + dden * mi);
                        g.iter_mut().for_each(|x| *x *= inv);
                        dm.iter_mut().zip(q).for_each(|(a, qi)| *a += dden * qi);
                    }
                }
                unsafe { matmul(d, dv, rows.len, ds.as_mut_ptr(), dv, true, qb.as_ptr(), 1, d, g.ptr, g.rs, g.cs) };
                // SAFETY: each token row belongs to one (head, split) task.
                unsafe { f.store_grad(Side::Query, rows, tb, scratch) };
            }
        },
    );
    sum_splits(&partial, dims, splits, 1.0 / dims.n as f32)
}

/// Per token block, with `[dS | dm] / N` from the query pass: `dK̂ = V dSᵀ/N + dm/N`, `dV = K̂ dS/N`; writes the
/// key-side input gradients and dv.
fn key_pass<F: FeatureMap>(f: &F, v: &View, dv_out: &View, dstates: &[f32], dims: Dims) {
    let (d, dv, width) = (dims.d, dims.dv, dims.width());
    (0..dims.bh() * dims.blocks()).into_par_iter().for_each_init(
        || {
            let (rows_d, rows_dv) = (vec![0.0f32; BLOCK * d], vec![0.0f32; BLOCK * dv]);
            (rows_d.clone(), rows_dv.clone(), rows_d, rows_dv, f.scratch(BLOCK))
        },
        |(kb, vb, dkb, dvb, scratch), task| {
            let (bh, blk) = (task / dims.blocks(), task % dims.blocks());
            let (b, h) = dims.head(bh);
            let n0 = blk * BLOCK;
            let rows = Rows { b, h, n0, len: (dims.n - n0).min(BLOCK) };
            let (ds, dm) = dstates[bh * width..(bh + 1) * width].split_at(d * dv);
            f.load(Side::Key, rows, kb, scratch);
            let vr = input_rows(v, rows, vb);
            // SAFETY: each (b, h, token block) belongs to one task.
            let (dvr, in_place) = unsafe { output_rows(dv_out, rows, dvb) };
            // SAFETY: kb, dkb hold len x d, vr and dvr address len x dv; dS is d x dv row-major.
            unsafe {
                matmul(rows.len, d, dv, dkb.as_mut_ptr(), d, false, vr.ptr, vr.rs, vr.cs, ds.as_ptr(), 1, dv);
                matmul(rows.len, dv, d, dvr.as_mut_ptr(), dv, false, kb.as_ptr(), d, 1, ds.as_ptr(), dv, 1);
            }
            for row in dkb[..rows.len * d].chunks_exact_mut(d) {
                row.iter_mut().zip(dm).for_each(|(x, mi)| *x += mi);
            }
            // SAFETY: as above.
            unsafe {
                f.store_grad(Side::Key, rows, dkb, scratch);
                if !in_place {
                    store_rows(dv_out, rows, dvr);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests;
