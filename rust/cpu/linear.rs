//! Linear-attention kernels on CPU (DyDiLA, LiT): the non-causal core `S = (1/Nk) Σ_n K̂_nᵀ V_n` (f32,
//! `D x Dv`), `O = Q̂ S` (divided by `Q̂ · mean(K̂) + eps` when normalising), forward and backward, over feature rows
//! that are either the inputs (linear attention) or DyDiLA's prologue (`features`).
//!
//! Layouts: q, q_aux `(B, H, N, D)`, k, k_aux `(B, H, Nk, D)`, v `(B, H, Nk, Dv)`, per-token parameters `(B, H, N)` on
//! the query side and `(B, H, Nk)` on the key side (`Nk != N`: cross-attention, `S = (1/Nk) Σ K̂ᵀ V`); any strides,
//! f32/f16/bf16, f32 accumulation (bf16 inputs on the `avx512bf16` level run the GEMMs as bf16 dot products, their
//! f32 operands — state, feature rows, gradients — rounded to bf16). Work runs on the parallel team (`parallel`) in
//! blocks of `BLOCK` tokens through the `gemm` crate: the state reduction over `(b, h, token split)` tasks (the token
//! range is split when `B·H` is small and the partial states are summed), the readout over `(b, h, token block)`
//! tasks. The backward mirrors it: a query pass (`dQ̂`, and the partial `dS`, `dm` it reduces) and a key pass (`dK̂`,
//! `dV`). Every token row is written by one task.

mod features;
mod power;
mod rows;

pub use features::{Dydila, Plain, Stream, StreamGrads};
use features::{load_rows, output_rows, store_rows, FeatureMap, Rows, Side};

use super::common::{active_isa, check_input, check_output, zeros, Dims};
use super::isa::Isa;
use super::matmul::{Gemm, Mat, MatMut, Precision};
use super::parallel::Team;
use super::view::{err, DType, View, ViewError};

/// Tokens per GEMM block: 256 measured up to 7% faster than 128 on one thread (linear fp32 forward+backward, B=1 H=4
/// N=4096 D=64, AVX-512), fewer GEMM calls and packings; 512 was no better.
const BLOCK: usize = 256;
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

/// The core's work split, from the call's shapes.
impl Dims {
    /// f32 values of one head's state: `S` (`d x dv`) then `m = mean K̂` (`d`).
    fn width(&self) -> usize {
        self.d * self.dv + self.d
    }

    fn blocks(&self) -> usize {
        self.n.div_ceil(BLOCK)
    }

    /// Token splits of the state reduction: enough tasks for every worker, never below `MIN_SPLIT_TOKENS` each.
    fn splits(&self, threads: usize) -> usize {
        let wanted = (TASKS_PER_THREAD * threads.max(1)).div_ceil(self.slices());
        wanted.clamp(1, self.n.div_ceil(MIN_SPLIT_TOKENS).max(1))
    }

    /// Token range of split `s` of `splits` (whole blocks).
    fn split_range(&self, s: usize, splits: usize) -> (usize, usize) {
        let per = self.blocks().div_ceil(splits) * BLOCK;
        ((s * per).min(self.n), ((s + 1) * per).min(self.n))
    }
}

/// Rows of a `(B, H, N, W)` view as a GEMM input: in place when the view is f32 (any strides), else converted into
/// `buf` (`rows.len x W`).
fn input_rows<'a>(view: &'a View, rows: Rows, buf: &'a mut [f32]) -> Mat<'a> {
    if view.dtype() == DType::F32 {
        return view.matrix(&[rows.b, rows.h, rows.n0, 0]);
    }
    load_rows(view, rows, buf);
    Mat::rows(buf, view.shape()[3])
}

/// The shapes of a call as the query side's and the key side's `Dims` (the same but for `n`: N and Nk).
fn check_qkv(q: &View, k: &View, v: &View) -> Result<(Dims, Dims), ViewError> {
    active_isa()?;
    for t in [q, k, v] {
        t.expect(4, true)?;
        if t.dtype() != q.dtype() {
            return err(format!("{}: dtype {:?} differs from q's {:?}", t.name(), t.dtype(), q.dtype()));
        }
    }
    let [batch, heads, n, d] = q.shape()[..] else { unreachable!("4 dims checked") };
    let (nk, dv) = (k.shape()[2], v.shape()[3]);
    if k.shape()[..2] != q.shape()[..2] || k.shape()[3] != d || v.shape()[..3] != k.shape()[..3] {
        return err(format!("shapes disagree: q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()));
    }
    if batch * heads * n * nk * d * dv == 0 {
        return err(format!("empty input: q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()));
    }
    let queries = Dims { batch, heads, n, d, dv };
    Ok((queries, Dims { n: nk, ..queries }))
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
        } else {
            check_input(t, &shape, DType::F32)?;
        }
    }
    Ok(())
}

fn check_dout(dout: &View, dims: Dims) -> Result<(), ViewError> {
    check_input(dout, &[dims.batch, dims.heads, dims.n, dims.dv], None)
}

/// One side's inputs against its `z` (q or k, checked by `check_qkv`) and its `dims`.
fn check_stream(s: &Stream, dims: Dims) -> Result<(), ViewError> {
    check_input(s.z_aux, s.z.shape(), s.z.dtype())?;
    for t in [s.gamma, s.gamma_aux, s.lambda] {
        check_input(t, &[dims.batch, dims.heads, dims.n], None)?;
    }
    Ok(())
}

fn check_stream_grads(g: &StreamGrads, like: &View, dims: Dims) -> Result<(), ViewError> {
    check_output(g.dz, like.shape(), like.dtype())?;
    check_output(g.dz_aux, like.shape(), like.dtype())?;
    for t in [g.dgamma, g.dgamma_aux, g.dlambda] {
        check_output(t, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    }
    Ok(())
}


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
    let (dims, keys) = check_qkv(q, k, v)?;
    check_options(opts)?;
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], q.dtype())?;
    check_state(state, ksum, dims, true)?;
    forward(&Plain { inputs: [q, k], grads: None }, v, out, state, ksum, [dims, keys], opts, threads)
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
    let (dims, keys) = check_qkv(q, k, v)?;
    check_options(opts)?;
    check_state(state, ksum, dims, false)?;
    check_dout(dout, dims)?;
    let [dq, dk, dv] = grads;
    check_output(dq, q.shape(), q.dtype())?;
    check_output(dk, k.shape(), q.dtype())?;
    check_output(dv, v.shape(), q.dtype())?;
    let f = Plain { inputs: [q, k], grads: Some([dq, dk]) };
    backward(&f, v, state, ksum, dout, dv, [dims, keys], opts, threads)
}

fn check_dydila(x: &DydilaInputs) -> Result<(Dims, Dims), ViewError> {
    let (dims, keys) = check_qkv(x.q.z, x.k.z, x.v)?;
    check_stream(&x.q, dims)?;
    check_stream(&x.k, keys)?;
    Ok((dims, keys))
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
    let (dims, keys) = check_dydila(x)?;
    check_options(opts)?;
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], x.q.z.dtype())?;
    check_state(state, ksum, dims, true)?;
    let f = Dydila { sides: [x.q, x.k], grads: None, eps: opts.eps };
    forward(&f, x.v, out, state, ksum, [dims, keys], opts, threads)
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
    let (dims, keys) = check_dydila(x)?;
    check_options(opts)?;
    check_state(state, ksum, dims, false)?;
    check_dout(dout, dims)?;
    check_stream_grads(&grads.q, x.q.z, dims)?;
    check_stream_grads(&grads.k, x.k.z, keys)?;
    check_output(grads.dv, x.v.shape(), x.q.z.dtype())?;
    let f = Dydila { sides: [x.q, x.k], grads: Some([grads.q, grads.k]), eps: opts.eps };
    backward(&f, x.v, state, ksum, dout, grads.dv, [dims, keys], opts, threads)
}

/// How the attention products of feature map `F` run for inputs of `dtype` (see [`FeatureMap::BF16_PRODUCTS`]).
fn products<F: FeatureMap>(dtype: DType) -> Precision {
    if F::BF16_PRODUCTS {
        Precision::for_inputs(dtype, Isa::current())
    } else {
        Precision::F32
    }
}

#[allow(clippy::too_many_arguments)]
fn forward<F: FeatureMap>(
    f: &F,
    v: &View,
    out: &View,
    state: &View,
    ksum: &View,
    [dims, keys]: [Dims; 2],
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let team = Team::new(threads);
    let precision = products::<F>(v.dtype());
    let states = reduce_state(team, f, v, keys, keys.splits(threads), precision)?;
    write_states(&states, state, ksum, dims);
    readout(team, f, out, &states, dims, opts, precision)
}

/// Sums `partial` (`bh x splits` slots of `width`) over the splits, times `scale`: `bh` slots.
fn sum_splits(team: Team, partial: &[f32], dims: Dims, splits: usize, scale: f32) -> Result<Vec<f32>, ViewError> {
    let width = dims.width();
    let mut total = zeros(dims.slices() * width)?;
    team.chunks_mut(&mut total, width, || Ok(()), |_, bh, t| {
        for part in partial[bh * splits * width..(bh + 1) * splits * width].chunks_exact(width) {
            t.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        t.iter_mut().for_each(|a| *a *= scale);
        Ok::<_, ViewError>(())
    })?;
    Ok(total)
}

/// `[S | m]` per head: `S = (1/Nk) Σ K̂ᵀ V`, `m = (1/Nk) Σ K̂` (`dims`: the key side's).
fn reduce_state<F: FeatureMap>(
    team: Team,
    f: &F,
    v: &View,
    dims: Dims,
    splits: usize,
    precision: Precision,
) -> Result<Vec<f32>, ViewError> {
    let (d, dv, width) = (dims.d, dims.dv, dims.width());
    let mut partial = zeros(dims.slices() * splits * width)?;
    team.chunks_mut(
        &mut partial,
        width,
        || Ok::<_, ViewError>((zeros(BLOCK * d)?, zeros(BLOCK * dv)?, f.scratch(BLOCK)?)),
        |(kb, vb, scratch), task, acc| {
            let (b, h) = dims.slice(task / splits);
            let (start, end) = dims.split_range(task % splits, splits);
            let (s, m) = acc.split_at_mut(d * dv);
            for n0 in (start..end).step_by(BLOCK) {
                let rows = Rows { b, h, n0, len: (end - n0).min(BLOCK) };
                f.load(Side::Key, rows, kb, scratch);
                // S += K̂ᵀ · V
                let vr = input_rows(v, rows, vb);
                Gemm { m: d, n: dv, k: rows.len, accumulate: true }.run_in(precision, MatMut::rows(s, dv), Mat::rows(kb, d).t(), vr);
                rows::add_rows(m, &kb[..rows.len * d]);
            }
            Ok::<(), ViewError>(())
        },
    )?;
    sum_splits(team, &partial, dims, splits, 1.0 / dims.n as f32)
}

fn write_states(states: &[f32], state: &View, ksum: &View, dims: Dims) {
    let (d, dv) = (dims.d, dims.dv);
    for (bh, st) in states.chunks_exact(dims.width()).enumerate() {
        let (b, h) = dims.slice(bh);
        for i in 0..d {
            // SAFETY: a validated contiguous f32 output; only this thread (outside any parallel region) writes it.
            unsafe { state.store_row(&[b, h, i], &st[i * dv..(i + 1) * dv]) };
        }
        // SAFETY: as for `state`.
        unsafe { ksum.store_row(&[b, h], &st[d * dv..]) };
    }
}

fn readout<F: FeatureMap>(
    team: Team,
    f: &F,
    out: &View,
    states: &[f32],
    dims: Dims,
    opts: Options,
    precision: Precision,
) -> Result<(), ViewError> {
    let (d, dv) = (dims.d, dims.dv);
    team.for_each_init(
        dims.slices() * dims.blocks(),
        || Ok::<_, ViewError>((zeros(BLOCK * d)?, zeros(BLOCK * dv)?, f.scratch(BLOCK)?)),
        |(qb, ob, scratch), task| {
            let (bh, blk) = (task / dims.blocks(), task % dims.blocks());
            let (b, h) = dims.slice(bh);
            let n0 = blk * BLOCK;
            let rows = Rows { b, h, n0, len: (dims.n - n0).min(BLOCK) };
            let (s, m) = states[bh * dims.width()..(bh + 1) * dims.width()].split_at(d * dv);
            f.load(Side::Query, rows, qb, scratch);
            // SAFETY: `out` is a validated contiguous output and each (b, h, token block) belongs to one task, so
            // this task alone touches these rows while `o` lives.
            let (o, in_place) = unsafe { output_rows(out, rows, ob) };
            // O = Q̂ · S
            Gemm { m: rows.len, n: dv, k: d, accumulate: false }.run_in(precision, MatMut::rows(o, dv), Mat::rows(qb, d), Mat::rows(s, dv));
            if opts.normalize {
                rows::normalize(o, &qb[..rows.len * d], m, opts.eps);
            }
            if !in_place {
                // SAFETY: as for `output_rows` above.
                unsafe { store_rows(out, rows, o) };
            }
            Ok(())
        },
    )
}

/// Reads `[S | m]` per head from the forward's outputs.
fn read_states(state: &View, ksum: &View, dims: Dims) -> Result<Vec<f32>, ViewError> {
    let (d, dv) = (dims.d, dims.dv);
    let mut states = zeros(dims.slices() * dims.width())?;
    for (bh, st) in states.chunks_exact_mut(dims.width()).enumerate() {
        let (b, h) = dims.slice(bh);
        for i in 0..d {
            state.load_row(&[b, h, i], &mut st[i * dv..(i + 1) * dv]);
        }
        ksum.load_row(&[b, h], &mut st[d * dv..]);
    }
    Ok(states)
}

#[allow(clippy::too_many_arguments)]
fn backward<F: FeatureMap>(
    f: &F,
    v: &View,
    state: &View,
    ksum: &View,
    dout: &View,
    dv_out: &View,
    [dims, keys]: [Dims; 2],
    opts: Options,
    threads: usize,
) -> Result<(), ViewError> {
    let team = Team::new(threads);
    let states = read_states(state, ksum, dims)?;
    // The backward's products run in f32 whatever the inputs: with bf16 dot products on the output and state
    // gradients (which are not inputs), small calls (N = 1..3) missed the bf16 reference's gradient accuracy.
    let dstates = query_pass(team, f, dout, &states, dims, opts, dims.splits(threads), keys.n)?;
    key_pass(team, f, v, dv_out, &dstates, keys)
}

/// Per token block: `T = g Sᵀ`; without normalisation `dQ̂ = T`, else with `den = Q̂·m + eps`,
/// `dden = −(Q̂·T)/den²`: `dQ̂ = T/den + dden m`, `g ← g/den`, `dm += dden Q̂`; then `dS += Q̂ᵀ g`.
/// Writes the query-side input gradients; returns `[dS | dm] / Nk` per head (`num_keys = Nk`: `S` is a mean over the
/// keys), summed over the splits.
#[allow(clippy::too_many_arguments)]
fn query_pass<F: FeatureMap>(
    team: Team,
    f: &F,
    dout: &View,
    states: &[f32],
    dims: Dims,
    opts: Options,
    splits: usize,
    num_keys: usize,
) -> Result<Vec<f32>, ViewError> {
    let (d, dv, width) = (dims.d, dims.dv, dims.width());
    let mut partial = zeros(dims.slices() * splits * width)?;
    team.chunks_mut(
        &mut partial,
        width,
        || Ok::<_, ViewError>((zeros(BLOCK * d)?, zeros(BLOCK * dv)?, zeros(BLOCK * d)?, f.scratch(BLOCK)?)),
        |(qb, gb, tb, scratch), task, acc| {
            let bh = task / splits;
            let (b, h) = dims.slice(bh);
            let (start, end) = dims.split_range(task % splits, splits);
            let (s, m) = states[bh * width..(bh + 1) * width].split_at(d * dv);
            let (ds, dm) = acc.split_at_mut(d * dv);
            for n0 in (start..end).step_by(BLOCK) {
                let rows = Rows { b, h, n0, len: (end - n0).min(BLOCK) };
                f.load(Side::Query, rows, qb, scratch);
                // T = g · Sᵀ, then dS += Q̂ᵀ · g (g rescaled in between when normalising)
                let (t_of, ds_of) = (Gemm { m: rows.len, n: d, k: dv, accumulate: false }, Gemm { m: d, n: dv, k: rows.len, accumulate: true });
                if opts.normalize {
                    // Normalising rescales g: it needs a copy.
                    load_rows(dout, rows, gb);
                    t_of.run(MatMut::rows(tb, d), Mat::rows(gb, dv), Mat::rows(s, dv).t());
                    let (len_d, len_dv) = (rows.len * d, rows.len * dv);
                    rows::normalize_grad(&qb[..len_d], m, opts.eps, &mut tb[..len_d], &mut gb[..len_dv], dm);
                    ds_of.run(MatMut::rows(ds, dv), Mat::rows(qb, d).t(), Mat::rows(gb, dv));
                } else {
                    let g = input_rows(dout, rows, gb);
                    t_of.run(MatMut::rows(tb, d), g, Mat::rows(s, dv).t());
                    ds_of.run(MatMut::rows(ds, dv), Mat::rows(qb, d).t(), g);
                }
                // SAFETY: the query-side gradient outputs are validated contiguous outputs, and each token row
                // belongs to one (head, split) task.
                unsafe { f.store_grad(Side::Query, rows, tb, scratch) };
            }
            Ok::<(), ViewError>(())
        },
    )?;
    sum_splits(team, &partial, dims, splits, 1.0 / num_keys as f32)
}

/// Per key block, with `[dS | dm] / Nk` from the query pass: `dK̂ = V dSᵀ/Nk + dm/Nk`, `dV = K̂ dS/Nk`; writes the
/// key-side input gradients and dv (`dims`: the key side's).
fn key_pass<F: FeatureMap>(
    team: Team,
    f: &F,
    v: &View,
    dv_out: &View,
    dstates: &[f32],
    dims: Dims,
) -> Result<(), ViewError> {
    let (d, dv, width) = (dims.d, dims.dv, dims.width());
    team.for_each_init(
        dims.slices() * dims.blocks(),
        || Ok::<_, ViewError>((zeros(BLOCK * d)?, zeros(BLOCK * dv)?, zeros(BLOCK * d)?, zeros(BLOCK * dv)?, f.scratch(BLOCK)?)),
        |(kb, vb, dkb, dvb, scratch), task| {
            let (bh, blk) = (task / dims.blocks(), task % dims.blocks());
            let (b, h) = dims.slice(bh);
            let n0 = blk * BLOCK;
            let rows = Rows { b, h, n0, len: (dims.n - n0).min(BLOCK) };
            let (ds, dm) = dstates[bh * width..(bh + 1) * width].split_at(d * dv);
            f.load(Side::Key, rows, kb, scratch);
            let vr = input_rows(v, rows, vb);
            // SAFETY: `dv_out` is a validated contiguous output and each (b, h, token block) belongs to one task, so
            // this task alone touches these rows while `dvr` lives.
            let (dvr, in_place) = unsafe { output_rows(dv_out, rows, dvb) };
            // dK̂ = V · dSᵀ ; dV = K̂ · dS
            Gemm { m: rows.len, n: d, k: dv, accumulate: false }.run(MatMut::rows(dkb, d), vr, Mat::rows(ds, dv).t());
            Gemm { m: rows.len, n: dv, k: d, accumulate: false }.run(MatMut::rows(dvr, dv), Mat::rows(kb, d), Mat::rows(ds, dv));
            for row in dkb[..rows.len * d].chunks_exact_mut(d) {
                row.iter_mut().zip(dm).for_each(|(x, mi)| *x += mi);
            }
            // SAFETY: the key-side gradient outputs and `dv_out` are validated contiguous outputs whose rows of this
            // (b, h, token block) only this task touches.
            unsafe {
                f.store_grad(Side::Key, rows, dkb, scratch);
                if !in_place {
                    store_rows(dv_out, rows, dvr);
                }
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests;
