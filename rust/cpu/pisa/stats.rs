//! The block statistics of PISA in one pass over the tokens (rows gathered through the layout, f32):
//! `k̄_j` (key mean), `w_j = V̂_j / n_j` (value mean), optionally `q̄_j` (query mean, for routing), the key variance
//! `(1/n_j) Σ_{t∈j} ‖k_t − k̄_j‖²` (a routing bias) and `H̄ = (1/N) Σ_j Σ_{t∈j} (k_t − k̄_j) v_tᵀ` (the mean moment
//! per token), reduced over blocks without materialising the per-block `H_j`. The moment routing biases'
//! `‖H_j − c·H̄‖_F` take a second pass that recomputes each `H_j` in a `D x Dv` buffer.
//!
//! Tasks are (slice, split of the blocks); each keeps a partial `Σ H_j`, summed per slice in a fixed order.

use super::{err, Layout};
use crate::alloc;
use crate::cpu::common::{active_isa, check_input, check_output, gather, zeros};
use crate::cpu::matmul::{Gemm, Mat, MatMut};
use crate::cpu::parallel::Team;
use crate::cpu::view::{DType, View, ViewError};

/// Tasks per worker the passes aim for.
const TASKS_PER_THREAD: usize = 2;

/// Outputs (f32, contiguous): `key_mean (B, H, M, D)`, `value_mean (B, H, M, Dv)`, and when given
/// `moment_mean (B, H, D, Dv)`, `query_mean (B, H, M, D)`, `key_variance (B, H, M)` and `spread (B, H, M)` with its
/// centring factor `c`: `‖H_j − c·H̄‖_F` (c > 0 needs `moment_mean`).
pub struct StatsOutputs<'a> {
    pub key_mean: &'a View,
    pub value_mean: &'a View,
    pub moment_mean: Option<&'a View>,
    pub query_mean: Option<&'a View>,
    pub key_variance: Option<&'a View>,
    pub spread: Option<(&'a View, f32)>,
}

#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    n: usize,
    d: usize,
    dv: usize,
    m: usize,
}

/// Checks `k (B, H, N, D)`, `v (B, H, N, Dv)` and the layout against each other: `[B, H, N, D, Dv, M]` (`M` blocks).
fn check_keys(k: &View, v: &View, layout: &Layout) -> Result<[usize; 6], ViewError> {
    active_isa()?;
    k.expect(4, true)?;
    v.expect(4, true)?;
    let [batch, heads, n, d] = k.shape()[..] else { unreachable!("4 dims checked") };
    let dv = v.shape()[3];
    check_input(v, &[batch, heads, n, dv], None)?;
    if layout.perm.len() != n {
        return err(format!("perm: length {} != N = {n}", layout.perm.len()));
    }
    Ok([batch, heads, n, d, dv, layout.num_blocks()])
}

/// Computes the requested statistics of `k`, `v` (and `q`) `(B, H, N, ·)` (any strides, float) over `layout`.
pub fn stats(k: &View, v: &View, q: Option<&View>, layout: &Layout, outs: &StatsOutputs, threads: usize) -> Result<(), ViewError> {
    let [batch, heads, n, d, dv, m] = check_keys(k, v, layout)?;
    if let Some(q) = q {
        check_input(q, &[batch, heads, n, d], None)?;
    }
    check_output(outs.key_mean, &[batch, heads, m, d], DType::F32)?;
    check_output(outs.value_mean, &[batch, heads, m, dv], DType::F32)?;
    if let Some(t) = outs.moment_mean {
        check_output(t, &[batch, heads, d, dv], DType::F32)?;
    }
    match (q, outs.query_mean) {
        (Some(_), Some(t)) => check_output(t, &[batch, heads, m, d], DType::F32)?,
        (None, None) => {}
        _ => return err("query_mean: q and query_mean come together"),
    }
    if let Some(t) = outs.key_variance {
        check_output(t, &[batch, heads, m], DType::F32)?;
    }
    if let Some((t, centre)) = outs.spread {
        check_output(t, &[batch, heads, m], DType::F32)?;
        if !centre.is_finite() || (centre != 0.0 && outs.moment_mean.is_none()) {
            return err("spread: a finite centring factor, and moment_mean when it is not 0");
        }
    }
    let shape = Shape { heads, n, d, dv, m };
    let slices = batch * heads;
    let splits = (TASKS_PER_THREAD * threads.max(1)).div_ceil(slices).clamp(1, m);
    let block = layout.max_block();
    let pass = Pass { k, v, layout, shape };
    let team = Team::new(threads);
    let partials: Vec<Vec<f32>> = team.map_init(
        slices * splits,
        || Rows::new(block, shape),
        |rows, task| pass.means_and_moments(q, outs, task / splits, (task % splits, splits), rows),
    )?;
    let means: Vec<Vec<f32>> = match outs.moment_mean {
        Some(moment_mean) => team.map(slices, |bh| pass.reduce(moment_mean, &partials[bh * splits..(bh + 1) * splits], bh))?,
        None => Vec::new(),
    };
    if let Some((spread, centre)) = outs.spread {
        // The centre c·H̄ of each slice (zero when c = 0: no moment_mean needed).
        let mut centres: Vec<Vec<f32>> = alloc::with_capacity(slices)?;
        for bh in 0..slices {
            centres.push(match means.get(bh) {
                Some(h) => alloc::collect(h.iter().map(|x| x * centre))?,
                None => zeros(alloc::size(&[d, dv])?)?,
            });
        }
        team.for_each_init(
            slices * splits,
            || Rows::new(block, shape),
            |rows, task| {
                pass.spread(spread, &centres[task / splits], task / splits, (task % splits, splits), rows);
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// The incoming gradients of the statistics (f32, any strides; a missing one adds nothing) and the input
/// gradients to write (`dk` like k, `dv` like v: any float dtype, contiguous).
pub struct StatsGrads<'a> {
    pub dkey_mean: Option<&'a View>,
    pub dvalue_mean: Option<&'a View>,
    pub dmoment_mean: Option<&'a View>,
    pub dk: &'a View,
    pub dv: &'a View,
}

/// The backward of [`stats`]' means and mean moment: for token `t` of block `j` (`n_j` tokens),
/// `dk_t = dk̄_j / n_j + (v_t − w_j) dH̄ᵀ / N` and `dv_t = dw_j / n_j + (k_t − k̄_j) dH̄ / N`, with the forward's
/// `key_mean` k̄ and `value_mean` w (f32). One task per (slice, block), whose tokens only it writes.
#[allow(clippy::too_many_arguments)]
pub fn stats_backward(
    k: &View,
    v: &View,
    layout: &Layout,
    key_mean: &View,
    value_mean: &View,
    grads: &StatsGrads,
    threads: usize,
) -> Result<(), ViewError> {
    let [batch, heads, n, d, dv, m] = check_keys(k, v, layout)?;
    check_input(key_mean, &[batch, heads, m, d], DType::F32)?;
    check_input(value_mean, &[batch, heads, m, dv], DType::F32)?;
    for (t, width) in [(grads.dkey_mean, d), (grads.dvalue_mean, dv)] {
        if let Some(t) = t {
            check_input(t, &[batch, heads, m, width], DType::F32)?;
        }
    }
    if let Some(t) = grads.dmoment_mean {
        check_input(t, &[batch, heads, d, dv], DType::F32)?;
    }
    check_output(grads.dk, &[batch, heads, n, d], k.dtype())?;
    check_output(grads.dv, &[batch, heads, n, dv], v.dtype())?;
    let shape = Shape { heads, n, d, dv, m };
    let slices = batch * heads;
    // dH̄ / N per slice, as it is (d x dv, for dv) and transposed (dv x d, for dk).
    let mut moments: Vec<(Vec<f32>, Vec<f32>)> = alloc::with_capacity(if grads.dmoment_mean.is_some() { slices } else { 0 })?;
    if let Some(dh) = grads.dmoment_mean {
        let inv = 1.0 / n as f32;
        for bh in 0..slices {
            let (mut w, mut wt) = (zeros(alloc::size(&[d, dv])?)?, zeros(alloc::size(&[d, dv])?)?);
            for i in 0..d {
                let row = &mut w[i * dv..(i + 1) * dv];
                dh.load_row(&[bh / heads, bh % heads, i], row);
                row.iter_mut().for_each(|x| *x *= inv);
                for (c, x) in row.iter().enumerate() {
                    wt[c * d + i] = *x;
                }
            }
            moments.push((w, wt));
        }
    }
    let block = layout.max_block();
    let pass = Pass { k, v, layout, shape };
    Team::new(threads).for_each_init(
        slices * m,
        || Ok::<_, ViewError>((Rows::new(block, shape)?, zeros(alloc::size(&[block, d.max(dv)])?)?)),
        |(rows, out), task| {
            let (bh, j) = (task / m, task % m);
            pass.block_grads(key_mean, value_mean, grads, moments.get(bh), (bh, j), rows, out);
            Ok(())
        },
    )
}

struct Rows {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    moment: Vec<f32>,
    row: Vec<f32>,
}

impl Rows {
    fn new(block: usize, shape: Shape) -> Result<Self, ViewError> {
        Ok(Rows {
            q: zeros(alloc::size(&[block, shape.d])?)?,
            k: zeros(alloc::size(&[block, shape.d])?)?,
            v: zeros(alloc::size(&[block, shape.dv])?)?,
            moment: zeros(alloc::size(&[shape.d, shape.dv])?)?,
            row: zeros(shape.d.max(shape.dv))?,
        })
    }
}

struct Pass<'a> {
    k: &'a View,
    v: &'a View,
    layout: &'a Layout,
    shape: Shape,
}

/// Column means of `rows x width` values into `out`.
fn column_mean(values: &[f32], rows: usize, width: usize, out: &mut [f32]) {
    out.fill(0.0);
    for r in values[..rows * width].chunks_exact(width) {
        out.iter_mut().zip(r).for_each(|(o, x)| *o += x);
    }
    let inv = 1.0 / rows as f32;
    out.iter_mut().for_each(|o| *o *= inv);
}

impl Pass<'_> {
    /// Gathers the keys and values of block `j` of slice `(b, h)`; returns the block's length.
    fn load(&self, b: usize, h: usize, j: usize, rows: &mut Rows) -> usize {
        gather(self.k, (b, h), self.layout.tokens(j), 1.0, &mut rows.k);
        gather(self.v, (b, h), self.layout.tokens(j), 1.0, &mut rows.v);
        self.layout.block(j).1
    }

    /// `rows.moment = Σ_t (k_t − k̄) v_tᵀ` of the loaded block, whose key mean is `rows.row[..d]`.
    fn block_moment(&self, len: usize, rows: &mut Rows, accumulate: bool) {
        let Shape { d, dv, .. } = self.shape;
        for r in rows.k[..len * d].chunks_exact_mut(d) {
            r.iter_mut().zip(&rows.row[..d]).for_each(|(x, mean)| *x -= mean);
        }
        Gemm { m: d, n: dv, k: len, accumulate }.run(MatMut::rows(&mut rows.moment, dv), Mat::rows(&rows.k, d).t(), Mat::rows(&rows.v, dv));
    }

    /// Means of the blocks of one split (written) and the split's partial `Σ H_j` (returned, `d x dv`).
    fn means_and_moments(&self, q: Option<&View>, outs: &StatsOutputs, bh: usize, split: (usize, usize), rows: &mut Rows) -> Result<Vec<f32>, ViewError> {
        let Shape { heads, d, dv, m, .. } = self.shape;
        let (b, h) = (bh / heads, bh % heads);
        rows.moment.fill(0.0);
        for j in (m * split.0 / split.1)..(m * (split.0 + 1) / split.1) {
            let len = self.load(b, h, j, rows);
            column_mean(&rows.v, len, dv, &mut rows.row[..dv]);
            // SAFETY: a validated contiguous f32 output, whose row j of slice bh only this task (the split holding
            // block j) touches.
            unsafe { outs.value_mean.store_row(&[b, h, j], &rows.row[..dv]) };
            if let (Some(q), Some(query_mean)) = (q, outs.query_mean) {
                gather(q, (b, h), self.layout.tokens(j), 1.0, &mut rows.q);
                column_mean(&rows.q, len, d, &mut rows.row[..d]);
                // SAFETY: a validated contiguous f32 output whose row j of slice bh only this task touches.
                unsafe { query_mean.store_row(&[b, h, j], &rows.row[..d]) };
            }
            column_mean(&rows.k, len, d, &mut rows.row[..d]);
            // SAFETY: a validated contiguous f32 output whose row j of slice bh only this task touches.
            unsafe { outs.key_mean.store_row(&[b, h, j], &rows.row[..d]) };
            if let Some(key_variance) = outs.key_variance {
                let mean = &rows.row[..d];
                let sq: f32 = rows.k[..len * d].chunks_exact(d).map(|r| r.iter().zip(mean).map(|(x, m)| (x - m) * (x - m)).sum::<f32>()).sum();
                // SAFETY: a validated contiguous f32 output whose element (b, h, j) only this task touches.
                unsafe { key_variance.store_f32(&[b, h, j], sq / len as f32) };
            }
            if outs.moment_mean.is_some() {
                self.block_moment(len, rows, true);
            }
        }
        Ok(alloc::copy(&rows.moment)?)
    }

    /// `H̄ = (1/N) Σ_j H_j` of slice `bh` from its splits' partial sums (written, and returned row-major `d x dv`).
    fn reduce(&self, moment_mean: &View, partials: &[Vec<f32>], bh: usize) -> Result<Vec<f32>, ViewError> {
        let Shape { heads, n, d, dv, .. } = self.shape;
        let mut mean = zeros(d * dv)?;
        for part in partials {
            mean.iter_mut().zip(part).for_each(|(x, y)| *x += y);
        }
        let inv = 1.0 / n as f32;
        mean.iter_mut().for_each(|x| *x *= inv);
        for i in 0..d {
            // SAFETY: a validated contiguous f32 output whose slice bh only this task touches.
            unsafe { moment_mean.store_row(&[bh / heads, bh % heads, i], &mean[i * dv..(i + 1) * dv]) };
        }
        Ok(mean)
    }

    /// [`stats_backward`] for block `j` of slice `bh` (`moment`: `dH̄ / N` and its transpose, when given).
    #[allow(clippy::too_many_arguments)]
    fn block_grads(
        &self,
        key_mean: &View,
        value_mean: &View,
        grads: &StatsGrads,
        moment: Option<&(Vec<f32>, Vec<f32>)>,
        (bh, j): (usize, usize),
        rows: &mut Rows,
        out: &mut [f32],
    ) {
        let Shape { heads, d, dv, .. } = self.shape;
        let (b, h) = (bh / heads, bh % heads);
        let len = self.layout.block(j).1;
        if len == 0 {
            return;
        }
        if moment.is_some() {
            self.load(b, h, j, rows);
        }
        // (gradient output, its width, the incoming mean gradient, the other side's rows and mean, dH̄/N as the
        // right factor of those centred rows)
        let sides = [
            (grads.dk, d, grads.dkey_mean, &mut rows.v, value_mean, dv, moment.map(|m| &m.1)),
            (grads.dv, dv, grads.dvalue_mean, &mut rows.k, key_mean, d, moment.map(|m| &m.0)),
        ];
        for (target, width, dmean, other, other_mean, other_width, factor) in sides {
            let out = &mut out[..len * width];
            match dmean {
                Some(dmean) => {
                    let row = &mut rows.row[..width];
                    dmean.load_row(&[b, h, j], row);
                    row.iter_mut().for_each(|x| *x /= len as f32);
                    for o in out.chunks_exact_mut(width) {
                        o.copy_from_slice(row);
                    }
                }
                None => out.fill(0.0),
            }
            if let Some(factor) = factor {
                let mean = &mut rows.row[..other_width];
                other_mean.load_row(&[b, h, j], mean);
                for r in other[..len * other_width].chunks_exact_mut(other_width) {
                    r.iter_mut().zip(mean.iter()).for_each(|(x, m)| *x -= m);
                }
                Gemm { m: len, n: width, k: other_width, accumulate: true }.run(
                    MatMut::rows(out, width),
                    Mat::rows(other, other_width),
                    Mat::rows(factor, width),
                );
            }
            for (t, o) in self.layout.tokens(j).zip(out.chunks_exact(width)) {
                // SAFETY: a validated contiguous output; blocks partition the tokens and this task alone holds
                // block j of slice bh, so it is the only one touching this row.
                unsafe { target.store_row(&[b, h, t], o) };
            }
        }
    }

    /// `‖H_j − centre‖_F` for the blocks of one split (`centre`: `d x dv`).
    fn spread(&self, spread: &View, centre: &[f32], bh: usize, split: (usize, usize), rows: &mut Rows) {
        let Shape { heads, d, m, .. } = self.shape;
        let (b, h) = (bh / heads, bh % heads);
        for j in (m * split.0 / split.1)..(m * (split.0 + 1) / split.1) {
            let len = self.load(b, h, j, rows);
            column_mean(&rows.k, len, d, &mut rows.row[..d]);
            self.block_moment(len, rows, false);
            let sq: f32 = rows.moment.iter().zip(centre).map(|(x, y)| (x - y) * (x - y)).sum();
            // SAFETY: a validated contiguous f32 output whose element (b, h, j) only this task (the split holding
            // block j) touches.
            unsafe { spread.store_f32(&[b, h, j], sq.sqrt()) };
        }
    }
}
