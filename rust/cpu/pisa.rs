//! PISA on CPU (`specs/pisa.md`): for each query block, one online softmax over the tokens of its selected key
//! blocks (exact phase) and then over the centroids of every other block (centroid phase: key `k̄_j`, logit bias
//! `ln n_j`, value `w_j = V̂_j / n_j`), plus the running `z = Σ_{j∉S} e^{c_j − m}` of the first-order term, rescaled
//! with everything else whenever the max rises. The backward recomputes the probabilities (FlashAttention-2
//! style), once per block pair: dq rows directly, the key-side gradients into per-task buffers summed afterwards,
//! so no two tasks write the same row and nothing needs atomics.
//!
//! Layouts: q, k `(B, H, N, D)`, v `(B, H, N, Dv)`, any strides, f32/f16/bf16; rows are gathered through the block
//! permutation `perm` (block order → token), blocks are runs `offsets[j]..offsets[j+1]` of it. Centroids
//! `key_mean (B, H, M, D)`, `value_mean (B, H, M, Dv)` and the mean moment `H̄ (B, H, D, Dv)` (`stats`) are f32
//! with any strides. Computation in f32, softmax in base 2.

mod backward;
mod stats;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use backward::{backward, BackwardOutputs, BackwardRows};
pub use stats::{stats, StatsOutputs};

use super::pool::pool;
use super::simd::matmul;
use super::vmath::{self, exp2_shift_sum};
use super::view::{err, DType, View, ViewError};

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN_2: f32 = std::f32::consts::LN_2;
/// Centroids per GEMM in the centroid phase.
pub const CHUNK: usize = 64;
/// Keys per GEMM in the exact phase: consecutive selected blocks are gathered together up to this many keys
/// (larger GEMMs, fewer online-softmax rescales).
pub(crate) const GROUP_KEYS: usize = 256;

fn to_index(name: &str, values: &[i64], bound: usize) -> Result<Vec<usize>, ViewError> {
    values
        .iter()
        .map(|&x| usize::try_from(x).ok().filter(|&u| u < bound).ok_or_else(|| ViewError(format!("{name}: value {x} out of range 0..{bound}"))))
        .collect()
}

/// The block layout: `perm` (block order → token) and `offsets` (`M + 1`, strictly rising from 0 to N).
pub struct Layout {
    pub perm: Vec<usize>,
    pub offsets: Vec<usize>,
    log2_count: Vec<f32>,
    inv_count: Vec<f32>,
}

impl Layout {
    pub fn new(perm: &[i64], offsets: &[i64], n: usize) -> Result<Self, ViewError> {
        let perm = to_index("perm", perm, n)?;
        if perm.len() != n {
            return err(format!("perm: length {} != N = {n}", perm.len()));
        }
        let mut seen = vec![false; n];
        if perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
            return err(format!("perm: not a permutation of 0..{n}"));
        }
        let offsets = to_index("offsets", offsets, n + 1)?;
        if offsets.len() < 2 || offsets[0] != 0 || offsets[offsets.len() - 1] != n || offsets.windows(2).any(|w| w[0] >= w[1]) {
            return err(format!("offsets: must rise strictly from 0 to N = {n} (every block non-empty)"));
        }
        let counts: Vec<f32> = offsets.windows(2).map(|w| (w[1] - w[0]) as f32).collect();
        Ok(Layout {
            perm,
            log2_count: counts.iter().map(|c| c.log2()).collect(),
            inv_count: counts.iter().map(|c| 1.0 / c).collect(),
            offsets,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.offsets.len() - 1
    }

    fn block(&self, j: usize) -> (usize, usize) {
        (self.offsets[j], self.offsets[j + 1] - self.offsets[j])
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
        let rows = slices * m;
        if rows == 0 || ids.len() % rows != 0 || ids.len() / rows == 0 || ids.len() / rows > m {
            return err(format!("blocks: need (B, H, M, k) ids with M = {m} and 1 <= k <= M, got {} values", ids.len()));
        }
        let k = ids.len() / rows;
        let ids = to_index("blocks", ids, m)?;
        let mut mask = vec![false; rows * m];
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

/// Shapes shared by the passes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    dv: usize,
    m: usize,
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

fn check_shape(t: &View, shape: &[usize], dtype: Option<DType>) -> Result<(), ViewError> {
    if t.shape != shape || dtype.is_some_and(|d| d != t.dtype) || !t.dtype.is_float() {
        return err(format!("{}: expected shape {shape:?}{}, got {:?} {:?}", t.name,
            dtype.map_or(String::new(), |d| format!(" and dtype {d:?}")), t.shape, t.dtype));
    }
    Ok(())
}

fn check_output(t: &View, shape: &[usize], dtype: DType) -> Result<(), ViewError> {
    check_shape(t, shape, Some(dtype))?;
    t.expect_contiguous()
}

impl Inputs<'_> {
    fn check(&self) -> Result<Dims, ViewError> {
        let q = self.q;
        q.expect(4, true)?;
        let (batch, heads, n, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
        self.v.expect(4, true)?;
        let dv = self.v.shape[3];
        let m = self.layout.num_blocks();
        check_shape(self.k, &[batch, heads, n, d], Some(q.dtype))?;
        check_shape(self.v, &[batch, heads, n, dv], Some(q.dtype))?;
        check_shape(self.key_mean, &[batch, heads, m, d], Some(DType::F32))?;
        check_shape(self.value_mean, &[batch, heads, m, dv], Some(DType::F32))?;
        if self.layout.perm.len() != n {
            return err(format!("perm: length {} != N = {n}", self.layout.perm.len()));
        }
        if self.selection.m != m || self.selection.ids.len() != batch * heads * m * self.selection.k {
            return err("blocks: selection does not match (B, H, M)");
        }
        Ok(Dims { batch, heads, n, d, dv, m })
    }

    /// `(b, h)` of slice `bh`.
    fn slice(&self, dims: Dims, bh: usize) -> (usize, usize) {
        (bh / dims.heads, bh % dims.heads)
    }
}

/// Gathers rows `perm[p0..p0+rows]` of `(b, h)` into `dst` (`rows x width`), scaled by `mul`.
#[allow(clippy::too_many_arguments)]
fn gather(t: &View, b: usize, h: usize, perm: &[usize], p0: usize, rows: usize, width: usize, mul: f32, dst: &mut [f32]) {
    for r in 0..rows {
        let row = &mut dst[r * width..(r + 1) * width];
        t.load_row(&[b, h, perm[p0 + r]], row);
        if mul != 1.0 {
            row.iter_mut().for_each(|x| *x *= mul);
        }
    }
}

/// Address of row `row` of slice `(b, h)` of a validated 4-D f32 view, with the strides of dims 2 and 3.
fn f32_rows(t: &View, b: usize, h: usize, row: usize) -> (*const f32, usize, usize) {
    ((t.ptr as *const f32).wrapping_add(t.offset(&[b, h, row, 0])), t.strides[2], t.strides[3])
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

/// Column biases of centroids `c0..c0+cols` for query block `i`: `log2 n_j`, or −∞ where j is selected. Returns
/// false when every centroid of the chunk is selected (nothing to do).
fn centroid_bias(layout: &Layout, selected: &[bool], c0: usize, cols: usize, bias: &mut [f32], weight: &mut [f32]) -> bool {
    let mut any = false;
    for c in 0..cols {
        let open = !selected[c0 + c];
        any |= open;
        bias[c] = if open { layout.log2_count[c0 + c] } else { f32::NEG_INFINITY };
        weight[c] = if open { layout.inv_count[c0 + c] } else { 0.0 };
    }
    any
}

/// Forward: writes `out (B, H, N, Dv)` (q's dtype), `lse (B, H, N)` (natural log of the softmax denominator, f32)
/// and `zeta (B, H, N)` (`z / den`: the first-order weight, f32); all contiguous. `moment_mean`: `H̄ (B, H, D, Dv)`
/// f32 for the hybrid order (`out += scale · z · q·H̄ / den`), or None for the zeroth order.
pub fn forward(x: &Inputs, moment_mean: Option<&View>, out: &View, lse: &View, zeta: &View, threads: usize) -> Result<(), ViewError> {
    let dims = x.check()?;
    if let Some(t) = moment_mean {
        check_shape(t, &[dims.batch, dims.heads, dims.d, dims.dv], Some(DType::F32))?;
    }
    check_output(out, &[dims.batch, dims.heads, dims.n, dims.dv], x.q.dtype)?;
    check_output(lse, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    check_output(zeta, &[dims.batch, dims.heads, dims.n], DType::F32)?;
    let pool = pool(threads).map_err(ViewError)?;
    let block = x.layout.max_block();
    pool.install(|| {
        (0..dims.batch * dims.heads * dims.m).into_par_iter().for_each_init(
            || ForwardBuffers::new(block, dims),
            |buf, task| forward_block(x, moment_mean, [out, lse, zeta], dims, task, buf),
        )
    });
    Ok(())
}

struct ForwardBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    first: Vec<f32>,
    row: Vec<f32>,
    bias: Vec<f32>,
    weight: Vec<f32>,
    state: State,
}

impl ForwardBuffers {
    fn new(block: usize, dims: Dims) -> Self {
        ForwardBuffers {
            q: vec![0.0; block * dims.d],
            k: vec![0.0; block.max(GROUP_KEYS) * dims.d],
            v: vec![0.0; block.max(GROUP_KEYS) * dims.dv],
            s: vec![0.0; block * block.max(CHUNK).max(GROUP_KEYS)],
            first: vec![0.0; block * dims.dv],
            row: vec![0.0; dims.dv],
            bias: vec![0.0; CHUNK],
            weight: vec![0.0; CHUNK],
            state: State::new(block, dims.dv),
        }
    }
}

/// The online-softmax state of a query block: running max `m`, denominator `l`, first-order sum `z` (all base 2
/// over logits in `log2 e` units) and the numerator `acc` (`rows x dv`).
struct State {
    m: Vec<f32>,
    l: Vec<f32>,
    z: Vec<f32>,
    acc: Vec<f32>,
    dv: usize,
}

impl State {
    fn new(rows: usize, dv: usize) -> Self {
        State { m: vec![0.0; rows], l: vec![0.0; rows], z: vec![0.0; rows], acc: vec![0.0; rows * dv], dv }
    }

    fn reset(&mut self, rows: usize) {
        self.m[..rows].fill(f32::NEG_INFINITY);
        self.l[..rows].fill(0.0);
        self.z[..rows].fill(0.0);
        self.acc[..rows * self.dv].fill(0.0);
    }

    /// Folds the logits `s` (`rows x cols`) in: rescales `l`, `z` and `acc` where the max rises and turns `s` into
    /// unnormalised probabilities. `z_weight` (per column, the centroid phase): `z += Σ_c p_c · z_weight[c]`.
    fn update(&mut self, s: &mut [f32], rows: usize, cols: usize, z_weight: Option<&[f32]>) {
        let dv = self.dv;
        for r in 0..rows {
            let row = &mut s[r * cols..(r + 1) * cols];
            let m_new = self.m[r].max(vmath::max(row));
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let alpha = if self.m[r] == f32::NEG_INFINITY { 0.0 } else { (self.m[r] - m_new).exp2() };
            self.l[r] = self.l[r] * alpha + exp2_shift_sum(row, m_new);
            let added = z_weight.map_or(0.0, |w| row.iter().zip(w).map(|(p, w)| p * w).sum::<f32>());
            self.z[r] = self.z[r] * alpha + added;
            self.m[r] = m_new;
            if alpha != 1.0 {
                self.acc[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= alpha);
            }
        }
    }
}

fn forward_block(x: &Inputs, moment_mean: Option<&View>, outs: [&View; 3], dims: Dims, task: usize, buf: &mut ForwardBuffers) {
    let [out, lse, zeta] = outs;
    let (layout, (d, dv, m)) = (x.layout, (dims.d, dims.dv, dims.m));
    let (bh, i) = (task / m, task % m);
    let (b, h) = x.slice(dims, bh);
    let (q0, lq) = layout.block(i);
    gather(x.q, b, h, &layout.perm, q0, lq, d, x.scale * LOG2_E, &mut buf.q);
    buf.state.reset(lq);
    for group in groups(layout, x.selection.row(bh, i)) {
        let mut lk = 0;
        for &j in group {
            let (k0, len) = layout.block(j);
            gather(x.k, b, h, &layout.perm, k0, len, d, 1.0, &mut buf.k[lk * d..]);
            gather(x.v, b, h, &layout.perm, k0, len, dv, 1.0, &mut buf.v[lk * dv..]);
            lk += len;
        }
        let s = &mut buf.s[..lq * lk];
        // SAFETY: the buffers hold lq x d, lk x d, lk x dv and lq x lk values (groups hold at most GROUP_KEYS keys
        // or one block).
        unsafe { matmul(lq, lk, d, s.as_mut_ptr(), lk, false, buf.q.as_ptr(), d, 1, buf.k.as_ptr(), 1, d) };
        buf.state.update(s, lq, lk, None);
        unsafe { matmul(lq, dv, lk, buf.state.acc.as_mut_ptr(), dv, true, s.as_ptr(), lk, 1, buf.v.as_ptr(), dv, 1) };
    }
    let selected = x.selection.mask_row(bh, i);
    for c0 in (0..m).step_by(CHUNK) {
        let cols = CHUNK.min(m - c0);
        if !centroid_bias(layout, selected, c0, cols, &mut buf.bias, &mut buf.weight) {
            continue;
        }
        let (km, km_rs, km_cs) = f32_rows(x.key_mean, b, h, c0);
        let (vm, vm_rs, vm_cs) = f32_rows(x.value_mean, b, h, c0);
        let s = &mut buf.s[..lq * cols];
        // SAFETY: key_mean / value_mean are validated f32 views of (B, H, M, ·) and c0 + cols <= M.
        unsafe { matmul(lq, cols, d, s.as_mut_ptr(), cols, false, buf.q.as_ptr(), d, 1, km, km_cs, km_rs) };
        for row in s.chunks_exact_mut(cols) {
            row.iter_mut().zip(&buf.bias[..cols]).for_each(|(x, b)| *x += b);
        }
        buf.state.update(s, lq, cols, Some(&buf.weight[..cols]));
        unsafe { matmul(lq, dv, cols, buf.state.acc.as_mut_ptr(), dv, true, s.as_ptr(), cols, 1, vm, vm_rs, vm_cs) };
    }
    if let Some(hm) = moment_mean {
        // first = q·H̄ · (scale · log2 e): the query rows are stored scaled.
        let (p, rs, cs) = f32_rows(hm, b, h, 0);
        // SAFETY: H̄ is a validated f32 view of (B, H, D, Dv); first holds lq x dv values.
        unsafe { matmul(lq, dv, d, buf.first.as_mut_ptr(), dv, false, buf.q.as_ptr(), d, 1, p, rs, cs) };
    }
    let st = &buf.state;
    for r in 0..lq {
        let token = layout.perm[q0 + r];
        let l = st.l[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        let row = &mut buf.row;
        row.copy_from_slice(&st.acc[r * dv..(r + 1) * dv]);
        if moment_mean.is_some() {
            let weight = st.z[r] / LOG2_E;
            row.iter_mut().zip(&buf.first[r * dv..(r + 1) * dv]).for_each(|(x, f)| *x += weight * f);
        }
        row.iter_mut().for_each(|x| *x *= inv);
        let log_den = if l > 0.0 { (st.m[r] + l.log2()) * LN_2 } else { f32::NEG_INFINITY };
        // SAFETY: perm is a permutation, so this task is the only writer of these rows.
        unsafe {
            out.store_row(&[b, h, token], row);
            lse.store_f32(&[b, h, token], log_den);
            zeta.store_f32(&[b, h, token], st.z[r] * inv);
        }
    }
}
