//! The PISA backward on CPU. With `g = dout`, `Δ = rowsum(g ∘ out)`, `ρ = scale · (q·H̄)·g` (0 for the zeroth
//! order) and `P` the softmax probabilities of the forward (recomputed from `lse`):
//!
//! - exact entries: `dℓ_u = P_u (g·v_u − Δ)`, so `dq += s dℓ_u k_u`, `dk_u += s dℓ_u q`, `dv_u += P_u g`;
//! - centroid entries: `dc_j = P_j (g·w_j + ρ / n_j − Δ)`, so `dq += s dc_j k̄_j`, `dk̄_j += s dc_j q`,
//!   `dw_j += P_j g` (the `ρ / n_j` term is the derivative of `ζ = z / den` that the first-order term scales).
//!
//! Three passes, each row written by one task: dq per query block; dk, dv per key block over the query blocks that
//! selected it; dk̄, dw per chunk of centroids over a split of the query blocks, the splits summed at the end.

use rayon::prelude::*;

use super::{centroid_bias, check_output, check_shape, f32_rows, gather, Dims, Inputs, CHUNK, LOG2_E};
use crate::cpu::pool::pool;
use crate::cpu::simd::{exp2_shift_sum, matmul};
use crate::cpu::view::{DType, View, ViewError};

/// Tasks per worker the centroid pass aims for when it splits the query blocks.
const TASKS_PER_THREAD: usize = 4;

/// Per-query rows of the backward: `dout (B, H, N, Dv)` (float, any strides); `lse`, `delta` and optional `rho`
/// `(B, H, N)` f32.
pub struct BackwardRows<'a> {
    pub dout: &'a View,
    pub lse: &'a View,
    pub delta: &'a View,
    pub rho: Option<&'a View>,
}

/// Gradients written by the backward (contiguous): `dq, dk, dv` in q's dtype (dk, dv: exact entries only) and
/// `dkey_mean (B, H, M, D)`, `dvalue_mean (B, H, M, Dv)` in f32.
pub struct BackwardOutputs<'a> {
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
    pub dkey_mean: &'a View,
    pub dvalue_mean: &'a View,
}

/// Backward of [`super::forward`]; see the module documentation for the formulas.
pub fn backward(x: &Inputs, rows: &BackwardRows, outs: &BackwardOutputs, threads: usize) -> Result<(), ViewError> {
    let dims = x.check()?;
    let (bt, h, n, d, dv, m) = (dims.batch, dims.heads, dims.n, dims.d, dims.dv, dims.m);
    check_shape(rows.dout, &[bt, h, n, dv], None)?;
    for t in [Some(rows.lse), Some(rows.delta), rows.rho].into_iter().flatten() {
        check_shape_f32(t, &[bt, h, n])?;
    }
    check_output(outs.dq, &[bt, h, n, d], x.q.dtype)?;
    check_output(outs.dk, &[bt, h, n, d], x.q.dtype)?;
    check_output(outs.dv, &[bt, h, n, dv], x.q.dtype)?;
    check_output(outs.dkey_mean, &[bt, h, m, d], DType::F32)?;
    check_output(outs.dvalue_mean, &[bt, h, m, dv], DType::F32)?;
    let pool = pool(threads).map_err(ViewError)?;
    let ctx = Ctx { x, rows, dims };
    let block = x.layout.max_block();
    let slices = bt * h;
    let chunks = m.div_ceil(CHUNK);
    let splits = (TASKS_PER_THREAD * threads.max(1)).div_ceil(slices * chunks).clamp(1, m);
    pool.install(|| {
        (0..slices * m).into_par_iter().for_each_init(|| Buffers::new(block, dims), |buf, task| ctx.dq_block(outs.dq, task, buf));
        (0..slices * m)
            .into_par_iter()
            .for_each_init(|| Buffers::new(block, dims), |buf, task| ctx.dkv_block(outs.dk, outs.dv, task, buf));
        let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..slices * chunks * splits)
            .into_par_iter()
            .map_init(|| Buffers::new(block, dims), |buf, task| ctx.centroid_chunk(task / splits, task % splits, splits, buf))
            .collect();
        (0..slices * chunks).into_par_iter().for_each(|task| ctx.store_centroid_grads(outs, &partials[task * splits..(task + 1) * splits], task));
    });
    Ok(())
}

fn check_shape_f32(t: &View, shape: &[usize]) -> Result<(), ViewError> {
    if t.shape != shape || t.dtype != DType::F32 {
        return Err(ViewError(format!("{}: expected f32 of shape {shape:?}, got {:?} {:?}", t.name, t.dtype, t.shape)));
    }
    Ok(())
}

struct Ctx<'a> {
    x: &'a Inputs<'a>,
    rows: &'a BackwardRows<'a>,
    dims: Dims,
}

struct Buffers {
    q: Vec<f32>,
    dout: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    rho: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    acc_a: Vec<f32>,
    acc_b: Vec<f32>,
    bias: Vec<f32>,
    weight: Vec<f32>,
}

impl Buffers {
    fn new(block: usize, dims: Dims) -> Self {
        let wide = block.max(CHUNK);
        Buffers {
            q: vec![0.0; block * dims.d],
            dout: vec![0.0; block * dims.dv],
            lse: vec![0.0; block],
            delta: vec![0.0; block],
            rho: vec![0.0; block],
            k: vec![0.0; block * dims.d],
            v: vec![0.0; block * dims.dv],
            p: vec![0.0; block * wide],
            dp: vec![0.0; block * wide],
            acc_a: vec![0.0; wide * dims.d],
            acc_b: vec![0.0; wide * dims.dv],
            bias: vec![0.0; CHUNK],
            weight: vec![0.0; CHUNK],
        }
    }
}

impl Ctx<'_> {
    /// Loads query block `i` of `(b, h)`: q (unscaled), dout, lse in base 2, delta and rho. Returns `(q0, lq)`.
    fn load_query(&self, b: usize, h: usize, i: usize, buf: &mut Buffers) -> (usize, usize) {
        let layout = self.x.layout;
        let (q0, lq) = layout.block(i);
        gather(self.x.q, b, h, &layout.perm, q0, lq, self.dims.d, 1.0, &mut buf.q);
        gather(self.rows.dout, b, h, &layout.perm, q0, lq, self.dims.dv, 1.0, &mut buf.dout);
        for r in 0..lq {
            let idx = [b, h, layout.perm[q0 + r]];
            buf.lse[r] = self.rows.lse.load_f32(&idx) * LOG2_E;
            buf.delta[r] = self.rows.delta.load_f32(&idx);
            buf.rho[r] = self.rows.rho.map_or(0.0, |t| t.load_f32(&idx));
        }
        (q0, lq)
    }

    fn load_key(&self, b: usize, h: usize, j: usize, buf: &mut Buffers) -> usize {
        let layout = self.x.layout;
        let (k0, lk) = layout.block(j);
        gather(self.x.k, b, h, &layout.perm, k0, lk, self.dims.d, 1.0, &mut buf.k);
        gather(self.x.v, b, h, &layout.perm, k0, lk, self.dims.dv, 1.0, &mut buf.v);
        lk
    }

    /// `p = P` and `dp = P ∘ (dout·vᵀ − Δ)` for the loaded query and key blocks.
    fn exact_probs(&self, lq: usize, lk: usize, buf: &mut Buffers) {
        let (d, dv) = (self.dims.d, self.dims.dv);
        let (p, dp) = (&mut buf.p[..lq * lk], &mut buf.dp[..lq * lk]);
        // SAFETY: the buffers hold lq x d, lk x d, lq x dv, lk x dv and lq x lk values.
        unsafe {
            matmul(lq, lk, d, p.as_mut_ptr(), lk, false, buf.q.as_ptr(), d, 1, buf.k.as_ptr(), 1, d);
            matmul(lq, lk, dv, dp.as_mut_ptr(), lk, false, buf.dout.as_ptr(), dv, 1, buf.v.as_ptr(), 1, dv);
        }
        let mul = self.x.scale * LOG2_E;
        for r in 0..lq {
            let row = &mut p[r * lk..(r + 1) * lk];
            row.iter_mut().for_each(|x| *x *= mul);
            exp2_shift_sum(row, buf.lse[r]);
            let (drow, delta) = (&mut dp[r * lk..(r + 1) * lk], buf.delta[r]);
            drow.iter_mut().zip(row.iter()).for_each(|(g, p)| *g = p * (*g - delta));
        }
    }

    /// `p = P` and `dp = P ∘ (dout·wᵀ + ρ/n − Δ)` for centroids `c0..c0+cols` (biases and weights in `buf`).
    fn centroid_probs(&self, b: usize, h: usize, c0: usize, cols: usize, lq: usize, buf: &mut Buffers) {
        let (d, dv) = (self.dims.d, self.dims.dv);
        let (km, km_rs, km_cs) = f32_rows(self.x.key_mean, b, h, c0);
        let (vm, vm_rs, vm_cs) = f32_rows(self.x.value_mean, b, h, c0);
        let (p, dp) = (&mut buf.p[..lq * cols], &mut buf.dp[..lq * cols]);
        // SAFETY: validated f32 views of (B, H, M, ·) with c0 + cols <= M; buffers hold lq x cols values.
        unsafe {
            matmul(lq, cols, d, p.as_mut_ptr(), cols, false, buf.q.as_ptr(), d, 1, km, km_cs, km_rs);
            matmul(lq, cols, dv, dp.as_mut_ptr(), cols, false, buf.dout.as_ptr(), dv, 1, vm, vm_cs, vm_rs);
        }
        let mul = self.x.scale * LOG2_E;
        for r in 0..lq {
            let row = &mut p[r * cols..(r + 1) * cols];
            row.iter_mut().zip(&buf.bias[..cols]).for_each(|(x, bias)| *x = *x * mul + bias);
            exp2_shift_sum(row, buf.lse[r]);
            let (drow, delta, rho) = (&mut dp[r * cols..(r + 1) * cols], buf.delta[r], buf.rho[r]);
            for ((g, p), w) in drow.iter_mut().zip(row.iter()).zip(&buf.weight[..cols]) {
                *g = p * (*g + rho * w - delta);
            }
        }
    }

    fn dq_block(&self, dq: &View, task: usize, buf: &mut Buffers) {
        let (d, m) = (self.dims.d, self.dims.m);
        let (bh, i) = (task / m, task % m);
        let (b, h) = self.x.slice(self.dims, bh);
        let (q0, lq) = self.load_query(b, h, i, buf);
        buf.acc_a[..lq * d].fill(0.0);
        for &j in self.x.selection.row(bh, i) {
            let lk = self.load_key(b, h, j, buf);
            self.exact_probs(lq, lk, buf);
            // SAFETY: acc_a holds lq x d, dp lq x lk, k lk x d values.
            unsafe { matmul(lq, d, lk, buf.acc_a.as_mut_ptr(), d, true, buf.dp.as_ptr(), lk, 1, buf.k.as_ptr(), d, 1) };
        }
        let selected = self.x.selection.mask_row(bh, i);
        for c0 in (0..m).step_by(CHUNK) {
            let cols = CHUNK.min(m - c0);
            if !centroid_bias(self.x.layout, selected, c0, cols, &mut buf.bias, &mut buf.weight) {
                continue;
            }
            self.centroid_probs(b, h, c0, cols, lq, buf);
            let (km, km_rs, km_cs) = f32_rows(self.x.key_mean, b, h, c0);
            // SAFETY: as in `centroid_probs`.
            unsafe { matmul(lq, d, cols, buf.acc_a.as_mut_ptr(), d, true, buf.dp.as_ptr(), cols, 1, km, km_rs, km_cs) };
        }
        for r in 0..lq {
            let row = &mut buf.acc_a[r * d..(r + 1) * d];
            row.iter_mut().for_each(|x| *x *= self.x.scale);
            // SAFETY: perm is a permutation: one writer per row.
            unsafe { dq.store_row(&[b, h, self.x.layout.perm[q0 + r]], row) };
        }
    }

    fn dkv_block(&self, dk: &View, dv_out: &View, task: usize, buf: &mut Buffers) {
        let (d, dv, m) = (self.dims.d, self.dims.dv, self.dims.m);
        let (bh, j) = (task / m, task % m);
        let (b, h) = self.x.slice(self.dims, bh);
        let lk = self.load_key(b, h, j, buf);
        buf.acc_a[..lk * d].fill(0.0);
        buf.acc_b[..lk * dv].fill(0.0);
        for &i in self.x.selection.selecting(bh, j) {
            let (_, lq) = self.load_query(b, h, i, buf);
            self.exact_probs(lq, lk, buf);
            // SAFETY: buffer sizes as in `exact_probs`; acc_a holds lk x d, acc_b lk x dv.
            unsafe {
                matmul(lk, dv, lq, buf.acc_b.as_mut_ptr(), dv, true, buf.p.as_ptr(), 1, lk, buf.dout.as_ptr(), dv, 1);
                matmul(lk, d, lq, buf.acc_a.as_mut_ptr(), d, true, buf.dp.as_ptr(), 1, lk, buf.q.as_ptr(), d, 1);
            }
        }
        let k0 = self.x.layout.offsets[j];
        for r in 0..lk {
            let token = self.x.layout.perm[k0 + r];
            let dk_row = &mut buf.acc_a[r * d..(r + 1) * d];
            dk_row.iter_mut().for_each(|x| *x *= self.x.scale);
            // SAFETY: perm is a permutation: one writer per row.
            unsafe {
                dk.store_row(&[b, h, token], dk_row);
                dv_out.store_row(&[b, h, token], &buf.acc_b[r * dv..(r + 1) * dv]);
            }
        }
    }

    /// Partial `(dk̄, dw)` of one chunk of centroids over split `split` of the query blocks (`cols x d`, `cols x dv`;
    /// dk̄ already times `scale`).
    fn centroid_chunk(&self, chunk_task: usize, split: usize, splits: usize, buf: &mut Buffers) -> (Vec<f32>, Vec<f32>) {
        let (d, dv, m) = (self.dims.d, self.dims.dv, self.dims.m);
        let chunks = m.div_ceil(CHUNK);
        let (bh, c0) = (chunk_task / chunks, (chunk_task % chunks) * CHUNK);
        let (b, h) = self.x.slice(self.dims, bh);
        let cols = CHUNK.min(m - c0);
        buf.acc_a[..cols * d].fill(0.0);
        buf.acc_b[..cols * dv].fill(0.0);
        for i in (m * split / splits)..(m * (split + 1) / splits) {
            if !centroid_bias(self.x.layout, self.x.selection.mask_row(bh, i), c0, cols, &mut buf.bias, &mut buf.weight) {
                continue;
            }
            let (_, lq) = self.load_query(b, h, i, buf);
            self.centroid_probs(b, h, c0, cols, lq, buf);
            // SAFETY: p, dp hold lq x cols; q lq x d; dout lq x dv; acc_a cols x d; acc_b cols x dv.
            unsafe {
                matmul(cols, d, lq, buf.acc_a.as_mut_ptr(), d, true, buf.dp.as_ptr(), 1, cols, buf.q.as_ptr(), d, 1);
                matmul(cols, dv, lq, buf.acc_b.as_mut_ptr(), dv, true, buf.p.as_ptr(), 1, cols, buf.dout.as_ptr(), dv, 1);
            }
        }
        let dkm = buf.acc_a[..cols * d].iter().map(|x| x * self.x.scale).collect();
        (dkm, buf.acc_b[..cols * dv].to_vec())
    }

    fn store_centroid_grads(&self, outs: &BackwardOutputs, partials: &[(Vec<f32>, Vec<f32>)], chunk_task: usize) {
        let (d, dv, m) = (self.dims.d, self.dims.dv, self.dims.m);
        let chunks = m.div_ceil(CHUNK);
        let (bh, c0) = (chunk_task / chunks, (chunk_task % chunks) * CHUNK);
        let (b, h) = self.x.slice(self.dims, bh);
        let (mut dkm, mut dvm) = (vec![0.0f32; d], vec![0.0f32; dv]);
        for c in 0..CHUNK.min(m - c0) {
            dkm.fill(0.0);
            dvm.fill(0.0);
            for (a, v) in partials {
                dkm.iter_mut().zip(&a[c * d..(c + 1) * d]).for_each(|(x, y)| *x += y);
                dvm.iter_mut().zip(&v[c * dv..(c + 1) * dv]).for_each(|(x, y)| *x += y);
            }
            // SAFETY: each (slice, chunk) task owns its centroid rows.
            unsafe {
                outs.dkey_mean.store_row(&[b, h, c0 + c], &dkm);
                outs.dvalue_mean.store_row(&[b, h, c0 + c], &dvm);
            }
        }
    }
}
