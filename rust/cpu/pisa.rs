//! PISA on CPU (piecewise sparse attention: exact attention on the selected key blocks, a Taylor expansion around
//! the block centroids on the others): for each query block, one online softmax over the tokens of its selected key
//! blocks (exact phase) and then over the centroids of every other block (centroid phase: key `k̄_j`, logit bias
//! `ln n_j`, value `w_j = V̂_j / n_j`), plus the running `z = Σ_{j∉S} n_j e^{c_j − m}` of the first-order term (the
//! centroids' share of the denominator: each unselected block's `q·H_j` is approximated by `n_j q·H̄`, `H̄` the mean
//! moment per token), rescaled with everything else whenever the max rises. The backward recomputes the probabilities (FlashAttention-2
//! style), once per block pair: dq rows directly, the key-side gradients into per-task buffers summed afterwards,
//! so no two tasks write the same row and nothing needs atomics.
//!
//! Layouts: q, k `(B, H, N, D)`, v `(B, H, N, Dv)`, any strides, f32/f16/bf16; rows are gathered through the block
//! permutation `perm` (block order → token), blocks are runs `offsets[j]..offsets[j+1]` of it. Centroids
//! `key_mean (B, H, M, D)`, `value_mean (B, H, M, Dv)` and the mean moment per token `H̄ (B, H, D, Dv)` (`stats`) are f32
//! with any strides. Computation in f32, softmax in base 2.

mod backward;
mod select;
mod stats;
#[cfg(test)]
mod tests;

pub use backward::{backward, BackwardOutputs, BackwardRows};
pub use select::top_blocks;
pub use stats::{stats, stats_backward, StatsGrads, StatsOutputs};

use super::common::{active_isa, check_input, check_output, gather, zeros, Dims, OnlineSoftmax, LOG2_E};
use crate::alloc;
use super::isa::Isa;
use super::matmul::{Gemm, Mat, MatMut, Precision};
use super::parallel::Team;
use super::view::{err, DType, View, ViewError};
use super::vmath;
/// Centroids per GEMM in the centroid phase.
pub const CHUNK: usize = 64;
/// Keys per GEMM in the exact phase: consecutive selected blocks are gathered together up to this many keys
/// (larger GEMMs, fewer online-softmax rescales).
pub(crate) const GROUP_KEYS: usize = 256;

fn to_index(name: &str, values: &[i64], bound: usize) -> Result<Vec<usize>, ViewError> {
    let mut out = alloc::with_capacity(values.len())?;
    for &x in values {
        out.push(usize::try_from(x).ok().filter(|&u| u < bound).ok_or_else(|| ViewError(format!("{name}: value {x} out of range 0..{bound}")))?);
    }
    Ok(out)
}

/// The block layout: `perm` (block order → token) and `offsets` (`M + 1`, strictly rising from 0 to N).
pub struct Layout {
    pub perm: Vec<usize>,
    pub offsets: Vec<usize>,
    log2_count: Vec<f32>,
}

impl Layout {
    pub fn new(perm: &[i64], offsets: &[i64], n: usize) -> Result<Self, ViewError> {
        let perm = to_index("perm", perm, n)?;
        if perm.len() != n {
            return err(format!("perm: length {} != N = {n}", perm.len()));
        }
        let mut seen = alloc::filled(n, false)?;
        if perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
            return err(format!("perm: not a permutation of 0..{n}"));
        }
        let offsets = to_index("offsets", offsets, n + 1)?;
        if offsets.len() < 2 || offsets[0] != 0 || offsets[offsets.len() - 1] != n || offsets.windows(2).any(|w| w[0] >= w[1]) {
            return err(format!("offsets: must rise strictly from 0 to N = {n} (every block non-empty)"));
        }
        let log2_count = alloc::collect(offsets.windows(2).map(|w| ((w[1] - w[0]) as f32).log2()))?;
        Ok(Layout { perm, log2_count, offsets })
    }

    pub fn num_blocks(&self) -> usize {
        self.offsets.len() - 1
    }

    fn block(&self, j: usize) -> (usize, usize) {
        (self.offsets[j], self.offsets[j + 1] - self.offsets[j])
    }

    /// The tokens of block `j`, in block order.
    fn tokens(&self, j: usize) -> impl Iterator<Item = usize> + '_ {
        let (p0, len) = self.block(j);
        self.perm[p0..p0 + len].iter().copied()
    }

    fn max_block(&self) -> usize {
        self.offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
}

/// The selected key blocks of every (slice, query block) (`slices = B·H`), as rows of `k` distinct ids, with the
/// dense membership mask.
pub struct Selection {
    pub k: usize,
    m: usize,
    ids: Vec<usize>,
    mask: Vec<bool>,
}

impl Selection {
    /// `ids`: `(slices, m, k)` flattened; validates ranges and distinctness of every row.
    pub fn new(ids: &[i64], slices: usize, m: usize) -> Result<Self, ViewError> {
        let rows = alloc::size(&[slices, m])?;
        if rows == 0 || !ids.len().is_multiple_of(rows) || ids.len() / rows == 0 || ids.len() / rows > m {
            return err(format!("blocks: need (B, H, M, k) ids with M = {m} and 1 <= k <= M, got {} values", ids.len()));
        }
        let k = ids.len() / rows;
        let ids = to_index("blocks", ids, m)?;
        let mut mask = alloc::filled(alloc::size(&[rows, m])?, false)?;
        for (r, row) in ids.chunks_exact(k).enumerate() {
            for &j in row {
                if std::mem::replace(&mut mask[r * m + j], true) {
                    return err(format!("blocks: block id {j} repeats in the selection of query block {}", r % m));
                }
            }
        }
        Ok(Selection { k, m, ids, mask })
    }

    fn row(&self, slice: usize, i: usize) -> &[usize] {
        let r = slice * self.m + i;
        &self.ids[r * self.k..(r + 1) * self.k]
    }

    fn mask_row(&self, slice: usize, i: usize) -> &[bool] {
        let r = slice * self.m + i;
        &self.mask[r * self.m..(r + 1) * self.m]
    }
}

/// The inputs of both passes: tokens, centroids and the layout they are gathered through.
pub struct Inputs<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub key_mean: &'a View,
    pub value_mean: &'a View,
    pub layout: &'a Layout,
    pub selection: &'a Selection,
    pub scale: f32,
}

impl Inputs<'_> {
    /// Checks every input against q's shape and the layout; `M` is `self.layout.num_blocks()`.
    fn check(&self) -> Result<Dims, ViewError> {
        active_isa()?;
        let q = self.q;
        q.expect(4, true)?;
        self.v.expect(4, true)?;
        let [batch, heads, n, d] = q.shape()[..] else { unreachable!("4 dims checked") };
        let dv = self.v.shape()[3];
        let m = self.layout.num_blocks();
        check_input(self.k, &[batch, heads, n, d], q.dtype())?;
        check_input(self.v, &[batch, heads, n, dv], q.dtype())?;
        check_input(self.key_mean, &[batch, heads, m, d], DType::F32)?;
        check_input(self.value_mean, &[batch, heads, m, dv], DType::F32)?;
        if self.layout.perm.len() != n {
            return err(format!("perm: length {} != N = {n}", self.layout.perm.len()));
        }
        if self.selection.m != m || self.selection.ids.len() != batch * heads * m * self.selection.k {
            return err("blocks: selection does not match (B, H, M)");
        }
        Ok(Dims { batch, heads, n, d, dv })
    }
}

/// Splits a list of blocks into runs of consecutive entries with at most `GROUP_KEYS` tokens (or one block).
fn groups<'a>(layout: &'a Layout, blocks: &'a [usize]) -> impl Iterator<Item = &'a [usize]> + 'a {
    let mut rest = blocks;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut tokens, mut take) = (layout.block(rest[0]).1, 1);
        while take < rest.len() && tokens + layout.block(rest[take]).1 <= GROUP_KEYS {
            tokens += layout.block(rest[take]).1;
            take += 1;
        }
        let (group, tail) = rest.split_at(take);
        rest = tail;
        Some(group)
    })
}

/// The last two dims of every slice of an f32 `(B, H, R, C)` view, transposed: `B·H` row-major `C x R` matrices
/// one after another. The GEMMs stream their right operand row by row and transpose one whose rows are not
/// contiguous element by element on every call; centroid products read these once-transposed copies instead.
fn transposed(t: &View, team: Team) -> Result<Vec<f32>, ViewError> {
    let [batch, heads, rows, cols] = t.shape()[..] else { unreachable!("checked 4-dim inputs") };
    let mut out = zeros(alloc::size(&[batch, heads, rows, cols])?)?;
    team.chunks_mut(&mut out, (rows * cols).max(1), || zeros::<f32>(cols), |row, bh, dst| {
        for r in 0..rows {
            t.load_row(&[bh / heads, bh % heads, r], row);
            for (c, &x) in row.iter().enumerate() {
                dst[c * rows + r] = x;
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Columns `c0..` of slice `bh`'s matrix in the output of [`transposed`] (`rows x cols` matrices): `rows x (cols −
/// c0)` at row stride `cols`.
fn columns(data: &[f32], (rows, cols): (usize, usize), bh: usize, c0: usize) -> Mat<'_> {
    let start = bh * rows * cols;
    Mat::rows(&data[start + c0..start + rows * cols], cols)
}

/// Column biases of centroids `c0..c0+cols` for query block `i`: `log2 n_j`, or −∞ where j is selected (so its
/// probability is 0). Returns false when every centroid of the chunk is selected (nothing to do).
fn centroid_bias(layout: &Layout, selected: &[bool], c0: usize, cols: usize, bias: &mut [f32]) -> bool {
    let mut any = false;
    for c in 0..cols {
        let open = !selected[c0 + c];
        any |= open;
        bias[c] = if open { layout.log2_count[c0 + c] } else { f32::NEG_INFINITY };
    }
    any
}

/// Forward: writes `out (B, H, N, Dv)` (q's dtype), `lse (B, H, N)` (natural log of the softmax denominator, f32)
/// and `zeta (B, H, N)` (`z / den`: the first-order weight, f32); all contiguous. `moment_mean`: `H̄ (B, H, D, Dv)`
/// f32, the mean moment per token, for the hybrid order (`out += scale · z · q·H̄ / den`), or None for the zeroth
/// order.
pub fn forward(x: &Inputs, moment_mean: Option<&View>, out: &View, lse: &View, zeta: &View, threads: usize) -> Result<(), ViewError> {
    let dims = x.check()?;
    if let Some(t) = moment_mean {
        check_input(t, &[dims.batch, dims.heads, dims.d, dims.dv], DType::F32)?;
    }
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], x.q.dtype())?;
    check_output(lse, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    check_output(zeta, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    let block = x.layout.max_block();
    let precision = Precision::for_inputs(x.q.dtype(), Isa::current());
    let team = Team::new(threads);
    let key_mean_t = transposed(x.key_mean, team)?;
    team.for_each_init(
        dims.slices() * x.layout.num_blocks(),
        || ForwardBuffers::new(block, dims),
        |buf, task| {
            forward_block(x, &key_mean_t, moment_mean, [out, lse, zeta], (dims, precision), task, buf);
            Ok(())
        },
    )
}

struct ForwardBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    first: Vec<f32>,
    row: Vec<f32>,
    bias: Vec<f32>,
    state: State,
}

impl ForwardBuffers {
    fn new(block: usize, dims: Dims) -> Result<Self, ViewError> {
        let wide = block.max(GROUP_KEYS);
        Ok(ForwardBuffers {
            q: zeros(alloc::size(&[block, dims.d])?)?,
            k: zeros(alloc::size(&[wide, dims.d])?)?,
            v: zeros(alloc::size(&[wide, dims.dv])?)?,
            s: zeros(alloc::size(&[block, block.max(CHUNK).max(GROUP_KEYS)])?)?,
            first: zeros(alloc::size(&[block, dims.dv])?)?,
            row: zeros(dims.dv)?,
            bias: zeros(CHUNK)?,
            state: State::new(block, dims.dv)?,
        })
    }
}

/// The online-softmax state of a query block (over logits in `log2 e` units) and the first-order sum
/// `z = Σ_{j∉S} n_j 2^(c_j − m)` of the centroid phase (its probabilities' sum), rescaled with it.
struct State {
    softmax: OnlineSoftmax,
    z: Vec<f32>,
}

impl State {
    fn new(rows: usize, dv: usize) -> Result<Self, ViewError> {
        Ok(State { softmax: OnlineSoftmax::new(rows, dv)?, z: zeros(rows)? })
    }

    fn reset(&mut self, rows: usize) {
        self.softmax.reset(rows);
        self.z[..rows].fill(0.0);
    }

    /// Folds the logits `mul · s` (`s`: `rows x cols`) in (see [`OnlineSoftmax::update`]), rescaling `z` as well;
    /// for centroids (`centroids`), `z += Σ_c p_c` (a selected centroid's `p` is 0), the sum the softmax made.
    fn update(&mut self, s: &mut [f32], rows: usize, cols: usize, mul: f32, centroids: bool) {
        let z = &mut self.z;
        self.softmax.update(s, rows, cols, mul, |r, _, alpha, sum| {
            z[r] = z[r] * alpha + if centroids { sum } else { 0.0 };
        });
    }
}

fn forward_block(x: &Inputs, key_mean_t: &[f32], moment_mean: Option<&View>, outs: [&View; 3], (dims, precision): (Dims, Precision), task: usize, buf: &mut ForwardBuffers) {
    let [out, lse, zeta] = outs;
    let (layout, (d, dv, m)) = (x.layout, (dims.d, dims.dv, x.layout.num_blocks()));
    let (bh, i) = (task / m, task % m);
    let (b, h) = dims.slice(bh);
    let (q0, lq) = layout.block(i);
    // bf16 products take q as it is (exact in bf16) and scale the logits instead (`logit_mul`).
    let (q_mul, logit_mul) = if precision.is_bf16() { (1.0, x.scale * LOG2_E) } else { (x.scale * LOG2_E, 1.0) };
    gather(x.q, (b, h), layout.tokens(i), q_mul, &mut buf.q);
    buf.state.reset(lq);
    for group in groups(layout, x.selection.row(bh, i)) {
        let mut lk = 0;
        for &j in group {
            gather(x.k, (b, h), layout.tokens(j), 1.0, &mut buf.k[lk * d..]);
            gather(x.v, (b, h), layout.tokens(j), 1.0, &mut buf.v[lk * dv..]);
            lk += layout.block(j).1;
        }
        let s = &mut buf.s[..lq * lk];
        // s = q · kᵀ ; acc += p · v (groups hold at most GROUP_KEYS keys or one block: the buffers' sizes)
        Gemm { m: lq, n: lk, k: d, accumulate: false }.run_in(precision, MatMut::rows(s, lk), Mat::rows(&buf.q, d), Mat::rows(&buf.k, d).t());
        buf.state.update(s, lq, lk, logit_mul, false);
        Gemm { m: lq, n: dv, k: lk, accumulate: true }.run_in(precision, MatMut::rows(&mut buf.state.softmax.acc, dv), Mat::rows(s, lk), Mat::rows(&buf.v, dv));
    }
    let selected = x.selection.mask_row(bh, i);
    for c0 in (0..m).step_by(CHUNK) {
        let cols = CHUNK.min(m - c0);
        if !centroid_bias(layout, selected, c0, cols, &mut buf.bias) {
            continue;
        }
        let (kmt, vm) = (columns(key_mean_t, (d, m), bh, c0), x.value_mean.matrix(&[b, h, c0, 0]));
        let s = &mut buf.s[..lq * cols];
        // s = q · k̄ᵀ + bias ; acc += p · w over centroids c0..c0+cols
        Gemm { m: lq, n: cols, k: d, accumulate: false }.run(MatMut::rows(s, cols), Mat::rows(&buf.q, d), kmt);
        for row in s.chunks_exact_mut(cols) {
            if logit_mul != 1.0 {
                vmath::scale(row, logit_mul);
            }
            vmath::add_scaled(row, &buf.bias[..cols], 1.0);
        }
        buf.state.update(s, lq, cols, 1.0, true);
        Gemm { m: lq, n: dv, k: cols, accumulate: true }.run(MatMut::rows(&mut buf.state.softmax.acc, dv), Mat::rows(s, cols), vm);
    }
    if let Some(hm) = moment_mean {
        // first = q·H̄ · (scale · log2 e) / logit_mul: the query rows are stored scaled, or the logits are.
        let hm = hm.matrix(&[b, h, 0, 0]);
        Gemm { m: lq, n: dv, k: d, accumulate: false }.run(MatMut::rows(&mut buf.first, dv), Mat::rows(&buf.q, d), hm);
    }
    let st = &buf.state;
    for r in 0..lq {
        let token = layout.perm[q0 + r];
        let inv = st.softmax.inverse(r);
        let row = &mut buf.row;
        row.copy_from_slice(&st.softmax.acc[r * dv..(r + 1) * dv]);
        if moment_mean.is_some() {
            let weight = st.z[r] / LOG2_E * logit_mul;
            vmath::add_scaled(row, &buf.first[r * dv..(r + 1) * dv], weight);
        }
        vmath::scale(row, inv);
        let log_den = st.softmax.log_denominator(r);
        // SAFETY: `out`, `lse`, `zeta` are validated contiguous outputs and perm is a permutation, so this task
        // (query block i of slice bh) is the only one touching row `token` of each.
        unsafe {
            out.store_row(&[b, h, token], row);
            lse.store_f32(&[b, h, token], log_den);
            zeta.store_f32(&[b, h, token], st.z[r] * inv);
        }
    }
}
