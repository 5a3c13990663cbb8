//! The PISA backward on CPU. With `g = dout`, `Δ = rowsum(g ∘ out)`, `ρ = scale · (q·H̄)·g` (0 for the zeroth
//! order) and `P` the softmax probabilities of the forward (recomputed from `lse`):
//!
//! - exact entries: `dℓ_u = P_u (g·v_u − Δ)`, so `dq += s dℓ_u k_u`, `dk_u += s dℓ_u q`, `dv_u += P_u g`;
//! - centroid entries: `dc_j = P_j (g·w_j + ρ − Δ)`, so `dq += s dc_j k̄_j`, `dk̄_j += s dc_j q`,
//!   `dw_j += P_j g` (the `ρ` term is the derivative of `ζ = z / den`, `z = Σ_U n_j e^{c_j−m}`, that the
//!   first-order term scales);
//! - the first-order term `s ζ q·H̄`: `dq += s ζ H̄ g`, `dH̄ += s ζ q gᵀ`.
//!
//! One pass over (slice, split of the query blocks) tasks computes every logit once (five GEMMs per block pair,
//! as FlashAttention-2): dq rows directly (one writer each), and the key-side gradients (dk, dv, dk̄, dw) into a
//! private f32 buffer of the task; a second pass sums the buffers of a slice's splits in a fixed order and writes
//! them. No atomics, deterministic.

use super::{centroid_bias, columns, groups, transposed, Inputs, CHUNK, GROUP_KEYS};
use crate::alloc;
use crate::cpu::common::{check_input, check_output, gather, zeros, Dims, LOG2_E};
use crate::cpu::isa::Isa;
use crate::cpu::matmul::{Gemm, Mat, MatMut, Precision};
use crate::cpu::parallel::Team;
use crate::cpu::view::{DType, View, ViewError};
use crate::cpu::vmath;

/// Tasks per worker the pass aims for when it splits the query blocks of a slice.
const TASKS_PER_THREAD: usize = 2;

/// What the backward reads besides the inputs: the forward's `out` and the upstream `dout` `(B, H, N, Dv)` (float,
/// any strides), its `lse` and `zeta` `(B, H, N)` f32, and `H̄ (B, H, D, Dv)` f32 for the hybrid order.
pub struct BackwardRows<'a> {
    pub out: &'a View,
    pub dout: &'a View,
    pub lse: &'a View,
    pub zeta: &'a View,
    pub moment_mean: Option<&'a View>,
}

/// Gradients written by the backward (contiguous): `dq, dk, dv` in q's dtype (dk, dv: exact entries only),
/// `dkey_mean (B, H, M, D)`, `dvalue_mean (B, H, M, Dv)` and, with `H̄`, `dmoment_mean (B, H, D, Dv)` in f32.
pub struct BackwardOutputs<'a> {
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
    pub dkey_mean: &'a View,
    pub dvalue_mean: &'a View,
    pub dmoment_mean: Option<&'a View>,
}

/// Backward of [`super::forward`]; see the module documentation for the formulas.
pub fn backward(x: &Inputs, rows: &BackwardRows, outs: &BackwardOutputs, threads: usize) -> Result<(), ViewError> {
    let dims = x.check()?;
    let (bt, h, n, d, dv, m) = (dims.batch, dims.heads, dims.n, dims.d, dims.dv, x.layout.num_blocks());
    check_input(rows.out, &[bt, h, n, dv], None)?;
    check_input(rows.dout, &[bt, h, n, dv], None)?;
    check_input(rows.lse, &[bt, h, n], DType::F32)?;
    check_input(rows.zeta, &[bt, h, n], DType::F32)?;
    match (rows.moment_mean, outs.dmoment_mean) {
        (Some(hm), Some(dhm)) => {
            check_input(hm, &[bt, h, d, dv], DType::F32)?;
            check_output(dhm, &[bt, h, d, dv], DType::F32)?;
        }
        (None, None) => {}
        _ => return Err(ViewError("dmoment_mean: comes with moment_mean".into())),
    }
    check_output(outs.dq, &[bt, h, n, d], x.q.dtype())?;
    check_output(outs.dk, &[bt, h, n, d], x.q.dtype())?;
    check_output(outs.dv, &[bt, h, n, dv], x.q.dtype())?;
    check_output(outs.dkey_mean, &[bt, h, m, d], DType::F32)?;
    check_output(outs.dvalue_mean, &[bt, h, m, dv], DType::F32)?;
    let team = Team::new(threads);
    let moment_mean_t = match rows.moment_mean {
        Some(hm) => transposed(hm, team)?,
        None => Vec::new(),
    };
    let means_t = [transposed(x.key_mean, team)?, transposed(x.value_mean, team)?, moment_mean_t];
    let ctx = Ctx { x, rows, dims, precision: Precision::for_inputs(x.q.dtype(), Isa::current()), means_t };
    let block = x.layout.max_block();
    let slices = bt * h;
    let splits = (TASKS_PER_THREAD * threads.max(1)).div_ceil(slices).clamp(1, m);
    let partials: Vec<KeyGrads> = team.map_init(
        slices * splits,
        || Buffers::new(block, dims),
        |buf, task| ctx.query_range(task / splits, task % splits, splits, outs.dq, buf),
    )?;
    team.for_each(slices * m, |task| {
        let bh = task / m;
        ctx.store_key_grads(outs, &partials[bh * splits..(bh + 1) * splits], bh, task % m)
    })?;
    if let Some(dhm) = outs.dmoment_mean {
        team.for_each(slices, |bh| ctx.store_moment_grad(dhm, &partials[bh * splits..(bh + 1) * splits], bh))?;
    }
    Ok(())
}

/// Key-side gradients of one task, f32: `dk (N x D)`, `dv (N x Dv)` by block position (unscaled), `dk̄ (M x D)`
/// (unscaled), `dw (M x Dv)`, and `dH̄ (D x Dv)` (unscaled; empty for the zeroth order).
struct KeyGrads {
    dk: Vec<f32>,
    dv: Vec<f32>,
    dkm: Vec<f32>,
    dvm: Vec<f32>,
    dhm: Vec<f32>,
}

struct Ctx<'a> {
    x: &'a Inputs<'a>,
    rows: &'a BackwardRows<'a>,
    dims: Dims,
    /// Of the exact entries' products (the centroid ones stay f32, as the centroids are).
    precision: Precision,
    /// `k̄ᵀ (D x M)`, `wᵀ (Dv x M)` and, for the hybrid order, `H̄ᵀ (Dv x D)` of every slice ([`transposed`]).
    means_t: [Vec<f32>; 3],
}

struct Buffers {
    q: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    zg: Vec<f32>,
    dq: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    rho: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    bias: Vec<f32>,
}

impl Buffers {
    fn new(block: usize, dims: Dims) -> Result<Self, ViewError> {
        let keys = block.max(GROUP_KEYS);
        let wide = keys.max(CHUNK);
        let buf = |rows: usize, cols: usize| -> Result<Vec<f32>, ViewError> { zeros(alloc::size(&[rows, cols])?) };
        Ok(Buffers {
            q: buf(block, dims.d)?,
            dout: buf(block, dims.dv)?,
            out: buf(block, dims.dv)?,
            zg: buf(block, dims.dv)?,
            dq: buf(block, dims.d)?,
            lse: zeros(block)?,
            delta: zeros(block)?,
            rho: zeros(block)?,
            k: buf(keys, dims.d)?,
            v: buf(keys, dims.dv)?,
            p: buf(block, wide)?,
            dp: buf(block, wide)?,
            bias: zeros(CHUNK)?,
        })
    }
}

impl Ctx<'_> {
    /// Loads query block `i` of `(b, h)`: q (unscaled), dout, lse in base 2, `Δ = dout·out`, and for the hybrid
    /// order `ρ = scale (q·H̄)·dout` and `zg = ζ dout`. Returns `(q0, lq)`.
    fn load_query(&self, b: usize, h: usize, i: usize, buf: &mut Buffers) -> (usize, usize) {
        let (layout, Dims { d, dv, .. }) = (self.x.layout, self.dims);
        let (q0, lq) = layout.block(i);
        gather(self.x.q, (b, h), layout.tokens(i), 1.0, &mut buf.q);
        gather(self.rows.dout, (b, h), layout.tokens(i), 1.0, &mut buf.dout);
        gather(self.rows.out, (b, h), layout.tokens(i), 1.0, &mut buf.out);
        for r in 0..lq {
            let idx = [b, h, layout.perm[q0 + r]];
            buf.lse[r] = self.rows.lse.load(&idx) * LOG2_E;
            let (g, o) = (&buf.dout[r * dv..(r + 1) * dv], &buf.out[r * dv..(r + 1) * dv]);
            buf.delta[r] = vmath::dot(g, o);
            buf.rho[r] = 0.0;
        }
        if let Some(hm) = self.rows.moment_mean {
            // r = q·H̄ into `out` (no longer needed)
            let hm = hm.matrix(&[b, h, 0, 0]);
            Gemm { m: lq, n: dv, k: d, accumulate: false }.run(MatMut::rows(&mut buf.out, dv), Mat::rows(&buf.q, d), hm);
            for r in 0..lq {
                let zeta = self.rows.zeta.load(&[b, h, layout.perm[q0 + r]]);
                let (g, first) = (&buf.dout[r * dv..(r + 1) * dv], &buf.out[r * dv..(r + 1) * dv]);
                buf.rho[r] = self.x.scale * vmath::dot(g, first);
                buf.zg[r * dv..(r + 1) * dv].iter_mut().zip(g).for_each(|(z, g)| *z = zeta * g);
            }
        }
        (q0, lq)
    }

    /// `p = 2^(p·scale·log2 e + bias − lse)` and `dp = p ∘ (dp + ρ − Δ)` over `lq x cols` (`bias` per column and
    /// the `ρ` term for centroids; neither for exact entries).
    fn probabilities(&self, lq: usize, cols: usize, centroid: bool, buf: &mut Buffers) {
        let mul = self.x.scale * LOG2_E;
        let (p, dp) = (&mut buf.p[..lq * cols], &mut buf.dp[..lq * cols]);
        let bias: &[f32] = if centroid { &buf.bias[..cols] } else { &[] };
        for r in 0..lq {
            let row = &mut p[r * cols..(r + 1) * cols];
            vmath::exp2_affine(row, mul, bias, buf.lse[r]);
            let (drow, delta, rho) = (&mut dp[r * cols..(r + 1) * cols], buf.delta[r], buf.rho[r]);
            if centroid {
                drow.iter_mut().zip(row.iter()).for_each(|(g, p)| *g = p * (*g + rho - delta));
            } else {
                vmath::softmax_grad(drow, row, delta);
            }
        }
    }

    /// dq of query blocks `split` of `splits` of slice `bh` (written), and their key-side gradients (returned).
    fn query_range(&self, bh: usize, split: usize, splits: usize, dq: &View, buf: &mut Buffers) -> Result<KeyGrads, ViewError> {
        let (Dims { n, d, dv, .. }, m) = (self.dims, self.x.layout.num_blocks());
        let (b, h) = self.dims.slice(bh);
        let hybrid = if self.rows.moment_mean.is_some() { d * dv } else { 0 };
        let mut grads = KeyGrads {
            dk: zeros(n * d)?, dv: zeros(n * dv)?, dkm: zeros(m * d)?, dvm: zeros(m * dv)?, dhm: zeros(hybrid)?,
        };
        for i in (m * split / splits)..(m * (split + 1) / splits) {
            let (q0, lq) = self.load_query(b, h, i, buf);
            buf.dq[..lq * d].fill(0.0);
            self.exact_entries(b, h, bh, i, lq, &mut grads, buf);
            self.centroid_entries(b, h, bh, i, lq, &mut grads, buf);
            if self.rows.moment_mean.is_some() {
                // dq += (ζ g)·H̄ᵀ ; dH̄ += qᵀ (ζ g)
                let hmt = columns(&self.means_t[2], (dv, d), bh, 0);
                Gemm { m: lq, n: d, k: dv, accumulate: true }.run(MatMut::rows(&mut buf.dq, d), Mat::rows(&buf.zg, dv), hmt);
                Gemm { m: d, n: dv, k: lq, accumulate: true }.run(MatMut::rows(&mut grads.dhm, dv), Mat::rows(&buf.q, d).t(), Mat::rows(&buf.zg, dv));
            }
            for r in 0..lq {
                let row = &mut buf.dq[r * d..(r + 1) * d];
                vmath::scale(row, self.x.scale);
                // SAFETY: `dq` is a validated contiguous output and perm is a permutation; query block i belongs to
                // this task, so it is the only one touching this row.
                unsafe { dq.store_row(&[b, h, self.x.layout.perm[q0 + r]], row) };
            }
        }
        Ok(grads)
    }

    #[allow(clippy::too_many_arguments)]
    fn exact_entries(&self, b: usize, h: usize, bh: usize, i: usize, lq: usize, grads: &mut KeyGrads, buf: &mut Buffers) {
        let (d, dv, layout) = (self.dims.d, self.dims.dv, self.x.layout);
        for group in groups(layout, self.x.selection.row(bh, i)) {
            let mut lk = 0;
            for &j in group {
                gather(self.x.k, (b, h), layout.tokens(j), 1.0, &mut buf.k[lk * d..]);
                gather(self.x.v, (b, h), layout.tokens(j), 1.0, &mut buf.v[lk * dv..]);
                lk += layout.block(j).1;
            }
            // p = q · kᵀ ; dp = dout · vᵀ, then dq += dS · k
            let precision = self.precision;
            Gemm { m: lq, n: lk, k: d, accumulate: false }.run_in(precision, MatMut::rows(&mut buf.p, lk), Mat::rows(&buf.q, d), Mat::rows(&buf.k, d).t());
            Gemm { m: lq, n: lk, k: dv, accumulate: false }.run_in(precision, MatMut::rows(&mut buf.dp, lk), Mat::rows(&buf.dout, dv), Mat::rows(&buf.v, dv).t());
            self.probabilities(lq, lk, false, buf);
            Gemm { m: lq, n: d, k: lk, accumulate: true }.run_in(precision, MatMut::rows(&mut buf.dq, d), Mat::rows(&buf.dp, lk), Mat::rows(&buf.k, d));
            let mut col = 0;
            for &j in group {
                let (k0, len) = layout.block(j);
                // dk_j += dSᵀ q ; dv_j += Pᵀ dout (columns col..col+len of dS and P; rows k0.. of the task's sums)
                let (ds_j, p_j) = (Mat::rows(&buf.dp[col..], lk).t(), Mat::rows(&buf.p[col..], lk).t());
                Gemm { m: len, n: d, k: lq, accumulate: true }.run_in(precision, MatMut::rows(&mut grads.dk[k0 * d..], d), ds_j, Mat::rows(&buf.q, d));
                Gemm { m: len, n: dv, k: lq, accumulate: true }.run_in(precision, MatMut::rows(&mut grads.dv[k0 * dv..], dv), p_j, Mat::rows(&buf.dout, dv));
                col += len;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn centroid_entries(&self, b: usize, h: usize, bh: usize, i: usize, lq: usize, grads: &mut KeyGrads, buf: &mut Buffers) {
        let (d, dv, m) = (self.dims.d, self.dims.dv, self.x.layout.num_blocks());
        let selected = self.x.selection.mask_row(bh, i);
        for c0 in (0..m).step_by(CHUNK) {
            let cols = CHUNK.min(m - c0);
            if !centroid_bias(self.x.layout, selected, c0, cols, &mut buf.bias) {
                continue;
            }
            let km = self.x.key_mean.matrix(&[b, h, c0, 0]);
            let (kmt, vmt) = (columns(&self.means_t[0], (d, m), bh, c0), columns(&self.means_t[1], (dv, m), bh, c0));
            // p = q · k̄ᵀ ; dp = dout · wᵀ over centroids c0..c0+cols
            Gemm { m: lq, n: cols, k: d, accumulate: false }.run(MatMut::rows(&mut buf.p, cols), Mat::rows(&buf.q, d), kmt);
            Gemm { m: lq, n: cols, k: dv, accumulate: false }.run(MatMut::rows(&mut buf.dp, cols), Mat::rows(&buf.dout, dv), vmt);
            self.probabilities(lq, cols, true, buf);
            // dq += dC · k̄ ; dk̄ += dCᵀ q ; dw += Pᵀ dout (rows c0.. of the task's sums)
            Gemm { m: lq, n: d, k: cols, accumulate: true }.run(MatMut::rows(&mut buf.dq, d), Mat::rows(&buf.dp, cols), km);
            let (dc, p) = (Mat::rows(&buf.dp, cols).t(), Mat::rows(&buf.p, cols).t());
            Gemm { m: cols, n: d, k: lq, accumulate: true }.run(MatMut::rows(&mut grads.dkm[c0 * d..], d), dc, Mat::rows(&buf.q, d));
            Gemm { m: cols, n: dv, k: lq, accumulate: true }.run(MatMut::rows(&mut grads.dvm[c0 * dv..], dv), p, Mat::rows(&buf.dout, dv));
        }
    }

    /// Sums the splits' `dH̄` of slice `bh` and writes it (times `scale`).
    fn store_moment_grad(&self, dhm: &View, partials: &[KeyGrads], bh: usize) -> Result<(), ViewError> {
        let Dims { d, dv, .. } = self.dims;
        let (b, h) = self.dims.slice(bh);
        let mut sum = zeros(d * dv)?;
        for part in partials {
            sum.iter_mut().zip(&part.dhm).for_each(|(x, y)| *x += y);
        }
        sum.iter_mut().for_each(|x| *x *= self.x.scale);
        for i in 0..d {
            // SAFETY: a validated contiguous f32 output whose slice bh only this task touches.
            unsafe { dhm.store_row(&[b, h, i], &sum[i * dv..(i + 1) * dv]) };
        }
        Ok(())
    }

    /// Sums the splits' gradients of key block `j` of slice `bh` (its tokens and its centroid) and writes them.
    fn store_key_grads(&self, outs: &BackwardOutputs, partials: &[KeyGrads], bh: usize, j: usize) -> Result<(), ViewError> {
        let Dims { d, dv, .. } = self.dims;
        let (b, h) = self.dims.slice(bh);
        let (k0, len) = self.x.layout.block(j);
        let (mut gk, mut gv) = (zeros(d)?, zeros(dv)?);
        for p in k0..k0 + len {
            sum_rows(&mut gk, &mut gv, partials.iter().map(|g| (&g.dk[p * d..(p + 1) * d], &g.dv[p * dv..(p + 1) * dv])));
            gk.iter_mut().for_each(|x| *x *= self.x.scale);
            // SAFETY: `dk`, `dv` are validated contiguous outputs and perm is a permutation; key block j of slice bh
            // belongs to this task, so it is the only one touching this row of either.
            unsafe {
                outs.dk.store_row(&[b, h, self.x.layout.perm[p]], &gk);
                outs.dv.store_row(&[b, h, self.x.layout.perm[p]], &gv);
            }
        }
        sum_rows(&mut gk, &mut gv, partials.iter().map(|g| (&g.dkm[j * d..(j + 1) * d], &g.dvm[j * dv..(j + 1) * dv])));
        gk.iter_mut().for_each(|x| *x *= self.x.scale);
        // SAFETY: validated contiguous f32 outputs whose centroid row j of slice bh only this task touches.
        unsafe {
            outs.dkey_mean.store_row(&[b, h, j], &gk);
            outs.dvalue_mean.store_row(&[b, h, j], &gv);
        }
        Ok(())
    }
}

/// `(gk, gv) = Σ (a, v)` over the splits, in order.
fn sum_rows<'a>(gk: &mut [f32], gv: &mut [f32], parts: impl Iterator<Item = (&'a [f32], &'a [f32])>) {
    gk.fill(0.0);
    gv.fill(0.0);
    for (a, v) in parts {
        gk.iter_mut().zip(a).for_each(|(x, y)| *x += y);
        gv.iter_mut().zip(v).for_each(|(x, y)| *x += y);
    }
}
