//! The attention engine over block plans, on CPU: for each query block, one online softmax over its list of
//! key blocks (full blocks without mask work, masked blocks with the element mask), and the matching backward
//! (dq per query block; dk, dv per key block over the transposed plan, so no two tasks write the same row).
//!
//! Layouts: q, k `(B, H, N, D)`, v `(B, H, Nk, Dv)`, any strides; rows are gathered through the plan's
//! permutations, so callers never permute tensors. Computation in f32, softmax in base 2.

use rayon::prelude::*;

use super::pool::pool;
use super::simd::matmul;
use super::vmath::{self, exp2_shift_sum};
use super::view::{err, View, ViewError};

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN_2: f32 = std::f32::consts::LN_2;
pub const FULL: u8 = 0;
pub const MASKED: u8 = 1;
/// Grid coordinates stay below this, so `dy² + dx²` fits in an i32.
const MAX_COORD: i32 = 32_768;
/// Keys per forward GEMM: consecutive key blocks of a query block are gathered into one panel up to this many
/// keys (larger GEMMs, fewer online-softmax passes).
const PANEL_KEYS: usize = 256;
/// The backward runs one pass per (b, h) slice when there are at least this many slices per thread (otherwise
/// two passes, over query blocks then key blocks, which parallelise within a slice).
const SLICES_PER_THREAD: usize = 2;

/// The element mask applied to `MASKED` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spatial {
    /// Every pair allowed (only key validity applies): GRAT.
    None,
    /// Image pairs allowed when `|dt| <= max_dt` and `dy² + dx² <= max_d2`; text and extra tokens always: CLEAR.
    Disc { max_d2: i64, max_dt: i64 },
}

/// A validated block plan (see `plan::blocks`), with its transpose for the key-side backward.
pub struct Plan {
    pub q_perm: Vec<usize>,
    pub q_offsets: Vec<usize>,
    pub k_perm: Vec<usize>,
    pub k_offsets: Vec<usize>,
    pub indptr: Vec<usize>,
    pub indices: Vec<usize>,
    pub kinds: Vec<u8>,
    pub t_indptr: Vec<usize>,
    pub t_indices: Vec<usize>,
    pub t_kinds: Vec<u8>,
    pub q_coords: Vec<i32>,
    pub k_coords: Vec<i32>,
    /// `(B, Nk)` in key layout order, 1 = valid; `None`: every key valid.
    pub key_valid: Option<Vec<i32>>,
    pub spatial: Spatial,
    /// The key coordinates as separate `t`, `y`, `x` arrays (the element mask's loop vectorises over them).
    key_columns: KeyColumns,
}

/// Key positions' `(t, y, x)` as three arrays (`t < 0`: text or extra key, always allowed by the disc).
struct KeyColumns {
    t: Vec<i32>,
    y: Vec<i32>,
    x: Vec<i32>,
}

impl KeyColumns {
    fn new(coords: &[i32]) -> Self {
        let column = |i: usize| coords.chunks_exact(3).map(|c| c[i]).collect();
        KeyColumns { t: column(0), y: column(1), x: column(2) }
    }
}

fn to_usize(name: &str, values: Vec<i64>, bound: usize) -> Result<Vec<usize>, ViewError> {
    values
        .into_iter()
        .map(|x| usize::try_from(x).ok().filter(|&u| u <= bound).ok_or_else(|| ViewError(format!("{name}: value {x} out of range 0..={bound}"))))
        .collect()
}

fn check_permutation(name: &str, perm: &[usize], n: usize) -> Result<(), ViewError> {
    if perm.len() != n {
        return err(format!("{name}: length {} != {n}", perm.len()));
    }
    let mut seen = vec![false; n];
    for &p in perm {
        if p >= n || std::mem::replace(&mut seen[p], true) {
            return err(format!("{name}: not a permutation of 0..{n}"));
        }
    }
    Ok(())
}

fn check_offsets(name: &str, offsets: &[usize], n: usize) -> Result<usize, ViewError> {
    if offsets.first() != Some(&0) || offsets.last() != Some(&n) || offsets.windows(2).any(|w| w[0] > w[1]) {
        return err(format!("{name}: must rise from 0 to {n}"));
    }
    Ok(offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
}

fn check_csr(name: &str, indptr: &[usize], indices: &[usize], kinds: &[u8], rows: usize, cols: usize) -> Result<(), ViewError> {
    if indptr.len() != rows + 1 || indptr[0] != 0 || indptr.windows(2).any(|w| w[0] > w[1]) || indptr[rows] != indices.len() {
        return err(format!("{name}: indptr does not describe {rows} rows of {} entries", indices.len()));
    }
    if kinds.len() != indices.len() || kinds.iter().any(|&k| k > MASKED) || indices.iter().any(|&j| j >= cols) {
        return err(format!("{name}: indices or kinds out of range"));
    }
    Ok(())
}

impl Plan {
    /// Validates every array against `nq` queries, `nk` keys and `batch`; any violation is an error, never UB.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        q_perm: Vec<i64>,
        q_offsets: Vec<i64>,
        k_perm: Vec<i64>,
        k_offsets: Vec<i64>,
        csr: (Vec<i64>, Vec<i64>, Vec<i32>),
        q_coords: Vec<i32>,
        k_coords: Vec<i32>,
        key_valid: Option<Vec<i32>>,
        spatial: Spatial,
        nq: usize,
        nk: usize,
        batch: usize,
    ) -> Result<Self, ViewError> {
        let q_perm = to_usize("q_perm", q_perm, nq)?;
        let k_perm = to_usize("k_perm", k_perm, nk)?;
        check_permutation("q_perm", &q_perm, nq)?;
        check_permutation("k_perm", &k_perm, nk)?;
        let q_offsets = to_usize("q_offsets", q_offsets, nq)?;
        let k_offsets = to_usize("k_offsets", k_offsets, nk)?;
        check_offsets("q_offsets", &q_offsets, nq)?;
        check_offsets("k_offsets", &k_offsets, nk)?;
        let (mq, mk) = (q_offsets.len() - 1, k_offsets.len() - 1);
        let indptr = to_usize("indptr", csr.0, usize::MAX >> 1)?;
        let indices = to_usize("indices", csr.1, usize::MAX >> 1)?;
        let kinds: Vec<u8> = csr.2.iter().map(|&k| k.clamp(0, 255) as u8).collect();
        if csr.2.iter().any(|&k| !(0..=1).contains(&k)) {
            return err("kinds: values must be 0 (full) or 1 (masked)");
        }
        check_csr("plan", &indptr, &indices, &kinds, mq, mk)?;
        if q_coords.len() != 3 * nq || k_coords.len() != 3 * nk {
            return err("coords: need 3 values per token");
        }
        // The element mask squares coordinate differences in i32.
        if q_coords.iter().chain(&k_coords).any(|&c| !(-2..MAX_COORD).contains(&c)) {
            return err(format!("coords: values must lie in -2..{MAX_COORD}"));
        }
        if let Some(valid) = &key_valid {
            if valid.len() != batch * nk {
                return err(format!("key_valid: need {batch} x {nk} values, got {}", valid.len()));
            }
        }
        let (t_indptr, t_indices, t_kinds) = transpose(&indptr, &indices, &kinds, mk);
        let key_columns = KeyColumns::new(&k_coords);
        Ok(Plan {
            q_perm, q_offsets, k_perm, k_offsets, indptr, indices, kinds, t_indptr, t_indices, t_kinds, q_coords, k_coords,
            key_valid, spatial, key_columns,
        })
    }

    fn max_q_block(&self) -> usize {
        self.q_offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    fn max_k_block(&self) -> usize {
        self.k_offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// Sets disallowed logits of the block pair to −∞ (`s` holds `rows` rows of `cols` logits at row stride
    /// `stride`): keys marked
    /// invalid for batch `b`, and for the disc image pairs with `|dt| > max_dt` or `dy² + dx² > max_d2` (text and
    /// extra tokens on either side are always allowed).
    #[allow(clippy::too_many_arguments)]
    fn apply_mask(&self, b: usize, q0: usize, k0: usize, rows: usize, cols: usize, s: &mut [f32], stride: usize) {
        let nk = self.k_perm.len();
        let valid = self.key_valid.as_ref().map(|v| &v[b * nk + k0..b * nk + k0 + cols]);
        let keys = &self.key_columns;
        let span = k0..k0 + cols;
        let (kt, ky, kx) = (&keys.t[span.clone()], &keys.y[span.clone()], &keys.x[span]);
        for r in 0..rows {
            let row = &mut s[r * stride..r * stride + cols];
            let qc = &self.q_coords[3 * (q0 + r)..3 * (q0 + r) + 3];
            if let Spatial::Disc { max_d2, max_dt } = self.spatial {
                if qc[0] >= 0 {
                    let limits = (max_d2.min(i32::MAX as i64) as i32, max_dt.min(i32::MAX as i64) as i32);
                    mask_disc_row(row, (qc[0], qc[1], qc[2]), (kt, ky, kx), limits);
                }
            }
            if let Some(valid) = valid {
                row.iter_mut().zip(valid).for_each(|(x, &ok)| *x = if ok == 0 { f32::NEG_INFINITY } else { *x });
            }
        }
    }
}

#[inline(always)]
fn mask_disc_row_body(row: &mut [f32], q: (i32, i32, i32), keys: (&[i32], &[i32], &[i32]), limits: (i32, i32)) {
    let (kt, ky, kx) = keys;
    let (max_d2, max_dt) = limits;
    for (c, x) in row.iter_mut().enumerate() {
        // Coordinates lie in -2..2^15 (checked by `Plan::new`), so the squares cannot overflow.
        let (dt, dy, dx) = ((q.0 - kt[c]).abs(), q.1 - ky[c], q.2 - kx[c]);
        let inside = kt[c] < 0 || (dt <= max_dt && dy * dy + dx * dx <= max_d2);
        *x = if inside { *x } else { f32::NEG_INFINITY };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mask_disc_row_avx2(row: &mut [f32], q: (i32, i32, i32), keys: (&[i32], &[i32], &[i32]), limits: (i32, i32)) {
    mask_disc_row_body(row, q, keys, limits)
}

/// The disc mask of one image query row over `row.len()` keys (see [`Plan::apply_mask`]).
fn mask_disc_row(row: &mut [f32], q: (i32, i32, i32), keys: (&[i32], &[i32], &[i32]), limits: (i32, i32)) {
    let n = row.len();
    let keys = (&keys.0[..n], &keys.1[..n], &keys.2[..n]);
    #[cfg(target_arch = "x86_64")]
    if vmath::has_avx2_fma() {
        // SAFETY: the features were detected at run time.
        return unsafe { mask_disc_row_avx2(row, q, keys, limits) };
    }
    mask_disc_row_body(row, q, keys, limits)
}

/// CSR transpose: for each key block the query blocks listing it, in increasing order.
fn transpose(indptr: &[usize], indices: &[usize], kinds: &[u8], cols: usize) -> (Vec<usize>, Vec<usize>, Vec<u8>) {
    let mut start = vec![0usize; cols + 1];
    for &j in indices {
        start[j + 1] += 1;
    }
    for j in 0..cols {
        start[j + 1] += start[j];
    }
    let mut fill = start.clone();
    let (mut t_indices, mut t_kinds) = (vec![0usize; indices.len()], vec![0u8; indices.len()]);
    for i in 0..indptr.len() - 1 {
        for e in indptr[i]..indptr[i + 1] {
            let slot = &mut fill[indices[e]];
            t_indices[*slot] = i;
            t_kinds[*slot] = kinds[e];
            *slot += 1;
        }
    }
    (start, t_indices, t_kinds)
}

/// Shapes shared by the passes.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    d: usize,
    dv: usize,
}

fn check_inputs(q: &View, k: &View, v: &View, plan: &Plan) -> Result<Dims, ViewError> {
    for t in [q, k, v] {
        t.expect(4, true)?;
        if t.dtype != q.dtype {
            return err(format!("{}: dtype differs from q", t.name));
        }
    }
    let (batch, heads, nq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (nk, dv) = (k.shape[2], v.shape[3]);
    if k.shape != [batch, heads, nk, d] || v.shape[..3] != [batch, heads, nk] {
        return err(format!("shapes disagree: q {:?}, k {:?}, v {:?}", q.shape, k.shape, v.shape));
    }
    if plan.q_perm.len() != nq || plan.k_perm.len() != nk {
        return err("plan does not match the sequence lengths of q and k");
    }
    Ok(Dims { batch, heads, d, dv })
}

fn check_output(t: &View, shape: &[usize], dtype: super::view::DType) -> Result<(), ViewError> {
    if t.shape != shape || t.dtype != dtype {
        return err(format!("{}: expected shape {shape:?} and dtype {dtype:?}, got {:?} {:?}", t.name, t.shape, t.dtype));
    }
    t.expect_contiguous()
}

/// Gathers rows `perm[p0..p0+rows]` of `(b, h)` into `dst` (`rows x width`), scaled by `mul`.
fn gather(t: &View, b: usize, h: usize, perm: &[usize], p0: usize, rows: usize, width: usize, mul: f32, dst: &mut [f32]) {
    for r in 0..rows {
        let row = &mut dst[r * width..(r + 1) * width];
        t.load_row(&[b, h, perm[p0 + r]], row);
        if mul != 1.0 {
            row.iter_mut().for_each(|x| *x *= mul);
        }
    }
}

/// Forward: writes `out (B, H, Nq, Dv)` (q's dtype, contiguous) and `lse (B, H, Nq)` (f32, natural log of
/// the softmax denominator of `scale · q·k`, −∞ for a query with no allowed key).
pub fn forward(q: &View, k: &View, v: &View, out: &View, lse: &View, plan: &Plan, scale: f32, threads: usize) -> Result<(), ViewError> {
    let dims = check_inputs(q, k, v, plan)?;
    let nq = q.shape[2];
    check_output(out, &[dims.batch, dims.heads, nq, dims.dv], q.dtype)?;
    check_output(lse, &[dims.batch, dims.heads, nq], super::view::DType::F32)?;
    let (bq, bk) = (plan.max_q_block(), plan.max_k_block());
    let mq = plan.q_offsets.len() - 1;
    let tasks = dims.batch * dims.heads * mq;
    let pool = pool(threads).map_err(ViewError)?;
    pool.install(|| {
        (0..tasks).into_par_iter().for_each_init(
            || ForwardBuffers::new(bq, bk, dims),
            |buf, task| forward_block(q, k, v, out, lse, plan, scale, dims, task, buf),
        )
    });
    Ok(())
}

struct ForwardBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl ForwardBuffers {
    fn new(bq: usize, bk: usize, dims: Dims) -> Self {
        let panel = bk.max(PANEL_KEYS);
        ForwardBuffers {
            q: vec![0.0; bq * dims.d],
            k: vec![0.0; panel * dims.d],
            v: vec![0.0; panel * dims.dv],
            s: vec![0.0; bq * panel],
            acc: vec![0.0; bq * dims.dv],
            m: vec![0.0; bq],
            l: vec![0.0; bq],
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_block(q: &View, k: &View, v: &View, out: &View, lse: &View, plan: &Plan, scale: f32, dims: Dims, task: usize, buf: &mut ForwardBuffers) {
    let mq = plan.q_offsets.len() - 1;
    let (bh, i) = (task / mq, task % mq);
    let (b, h) = (bh / dims.heads, bh % dims.heads);
    let (q0, lq) = (plan.q_offsets[i], plan.q_offsets[i + 1] - plan.q_offsets[i]);
    let (d, dv) = (dims.d, dims.dv);
    gather(q, b, h, &plan.q_perm, q0, lq, d, scale * LOG2_E, &mut buf.q);
    buf.m[..lq].fill(f32::NEG_INFINITY);
    buf.l[..lq].fill(0.0);
    buf.acc[..lq * dv].fill(0.0);
    let mut entries = plan.indptr[i]..plan.indptr[i + 1];
    while !entries.is_empty() {
        // A panel: consecutive entries gathered side by side, up to PANEL_KEYS keys (or one block).
        let first = entries.start;
        let mut lk = 0;
        while let Some(e) = entries.clone().next() {
            let j = plan.indices[e];
            let (k0, len) = (plan.k_offsets[j], plan.k_offsets[j + 1] - plan.k_offsets[j]);
            if lk > 0 && lk + len > PANEL_KEYS {
                break;
            }
            gather(k, b, h, &plan.k_perm, k0, len, d, 1.0, &mut buf.k[lk * d..]);
            gather(v, b, h, &plan.k_perm, k0, len, dv, 1.0, &mut buf.v[lk * dv..]);
            lk += len;
            entries.start += 1;
        }
        let s = &mut buf.s[..lq * lk];
        // SAFETY: buffers hold at least lq x d, lk x d, lk x dv and lq x lk elements (panels are at most
        // max(PANEL_KEYS, largest key block) keys).
        unsafe { matmul(lq, lk, d, s.as_mut_ptr(), lk, false, buf.q.as_ptr(), d, 1, buf.k.as_ptr(), 1, d) };
        let mut column = 0;
        for e in first..entries.start {
            let j = plan.indices[e];
            let (k0, len) = (plan.k_offsets[j], plan.k_offsets[j + 1] - plan.k_offsets[j]);
            if plan.kinds[e] == MASKED {
                plan.apply_mask(b, q0, k0, lq, len, &mut s[column..], lk);
            }
            column += len;
        }
        for r in 0..lq {
            let row = &mut s[r * lk..(r + 1) * lk];
            let row_max = vmath::max(row);
            let m_new = buf.m[r].max(row_max);
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let alpha = if buf.m[r] == f32::NEG_INFINITY { 0.0 } else { (buf.m[r] - m_new).exp2() };
            buf.l[r] = buf.l[r] * alpha + exp2_shift_sum(row, m_new);
            buf.m[r] = m_new;
            if alpha != 1.0 {
                buf.acc[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= alpha);
            }
        }
        // SAFETY: as above; acc holds lq x dv.
        unsafe { matmul(lq, dv, lk, buf.acc.as_mut_ptr(), dv, true, s.as_ptr(), lk, 1, buf.v.as_ptr(), dv, 1) };
    }
    for r in 0..lq {
        let row = &mut buf.acc[r * dv..(r + 1) * dv];
        let l = buf.l[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        row.iter_mut().for_each(|x| *x *= inv);
        let token = plan.q_perm[q0 + r];
        let log_den = if l > 0.0 { (buf.m[r] + l.log2()) * LN_2 } else { f32::NEG_INFINITY };
        // SAFETY: q_perm is a permutation, so this task is the only writer of these rows.
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
    plan: &Plan,
    scale: f32,
    threads: usize,
) -> Result<(), ViewError> {
    let dims = check_inputs(q, k, v, plan)?;
    let (nq, nk) = (q.shape[2], k.shape[2]);
    dout.expect(4, true)?;
    if dout.shape != [dims.batch, dims.heads, nq, dims.dv] {
        return err(format!("dout: expected shape {:?}", [dims.batch, dims.heads, nq, dims.dv]));
    }
    for t in [lse, delta] {
        if t.shape != [dims.batch, dims.heads, nq] || t.dtype != super::view::DType::F32 {
            return err(format!("{}: expected f32 of shape {:?}", t.name, [dims.batch, dims.heads, nq]));
        }
    }
    check_output(dq, &[dims.batch, dims.heads, nq, dims.d], q.dtype)?;
    check_output(dk, &[dims.batch, dims.heads, nk, dims.d], q.dtype)?;
    check_output(dv, &[dims.batch, dims.heads, nk, dims.dv], q.dtype)?;
    let (bq, bk) = (plan.max_q_block(), plan.max_k_block());
    let pool = pool(threads).map_err(ViewError)?;
    let (mq, mk) = (plan.q_offsets.len() - 1, plan.k_offsets.len() - 1);
    let ctx = BackwardCtx { q, k, v, dout, lse, delta, plan, scale, dims };
    let slices = dims.batch * dims.heads;
    if slices >= SLICES_PER_THREAD * pool.current_num_threads() {
        // Enough slices to keep every thread busy: one pass per slice, which owns its dq rows.
        pool.install(|| {
            (0..slices).into_par_iter().for_each_init(
                || (BackwardBuffers::new(bq, bk, dims), Vec::new()),
                |(buf, dq_acc), bh| ctx.slice_backward(dq, dk, dv, bh, buf, dq_acc),
            )
        });
        return Ok(());
    }
    pool.install(|| {
        (0..dims.batch * dims.heads * mq)
            .into_par_iter()
            .for_each_init(|| BackwardBuffers::new(bq, bk, dims), |buf, task| ctx.dq_block(dq, task, buf));
        (0..dims.batch * dims.heads * mk)
            .into_par_iter()
            .for_each_init(|| BackwardBuffers::new(bq, bk, dims), |buf, task| ctx.dkv_block(dk, dv, task, buf));
    });
    Ok(())
}

struct BackwardCtx<'a> {
    q: &'a View,
    k: &'a View,
    v: &'a View,
    dout: &'a View,
    lse: &'a View,
    delta: &'a View,
    plan: &'a Plan,
    scale: f32,
    dims: Dims,
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
    fn new(bq: usize, bk: usize, dims: Dims) -> Self {
        let rows = bq.max(bk);
        BackwardBuffers {
            q: vec![0.0; bq * dims.d],
            k: vec![0.0; bk * dims.d],
            v: vec![0.0; bk * dims.dv],
            dout: vec![0.0; bq * dims.dv],
            p: vec![0.0; bq * bk],
            dp: vec![0.0; bq * bk],
            acc_a: vec![0.0; rows * dims.d],
            acc_b: vec![0.0; rows * dims.dv],
            lse: vec![0.0; bq],
            delta: vec![0.0; bq],
        }
    }
}

impl BackwardCtx<'_> {
    /// Loads the query side of block `i` (q scaled by `scale·log2 e`, dout, lse in base 2, delta).
    fn load_query_block(&self, b: usize, h: usize, i: usize, buf: &mut BackwardBuffers) -> (usize, usize) {
        let plan = self.plan;
        let (q0, lq) = (plan.q_offsets[i], plan.q_offsets[i + 1] - plan.q_offsets[i]);
        gather(self.q, b, h, &plan.q_perm, q0, lq, self.dims.d, 1.0, &mut buf.q);
        gather(self.dout, b, h, &plan.q_perm, q0, lq, self.dims.dv, 1.0, &mut buf.dout);
        for r in 0..lq {
            let token = plan.q_perm[q0 + r];
            buf.lse[r] = self.lse.load_f32(&[b, h, token]) * LOG2_E;
            buf.delta[r] = self.delta.load_f32(&[b, h, token]);
        }
        (q0, lq)
    }

    fn load_key_block(&self, b: usize, h: usize, j: usize, buf: &mut BackwardBuffers) -> (usize, usize) {
        let plan = self.plan;
        let (k0, lk) = (plan.k_offsets[j], plan.k_offsets[j + 1] - plan.k_offsets[j]);
        gather(self.k, b, h, &plan.k_perm, k0, lk, self.dims.d, 1.0, &mut buf.k);
        gather(self.v, b, h, &plan.k_perm, k0, lk, self.dims.dv, 1.0, &mut buf.v);
        (k0, lk)
    }

    /// P = softmax probabilities and dS = P ∘ (dout·vᵀ − delta) for the loaded block pair (into `p`, `dp`).
    fn probabilities(&self, b: usize, q0: usize, lq: usize, k0: usize, lk: usize, kind: u8, buf: &mut BackwardBuffers) {
        let (d, dv) = (self.dims.d, self.dims.dv);
        let (p, dp) = (&mut buf.p[..lq * lk], &mut buf.dp[..lq * lk]);
        // SAFETY: buffer sizes cover lq x d, lk x d, lk x dv, lq x dv and lq x lk.
        unsafe {
            matmul(lq, lk, d, p.as_mut_ptr(), lk, false, buf.q.as_ptr(), d, 1, buf.k.as_ptr(), 1, d);
            matmul(lq, lk, dv, dp.as_mut_ptr(), lk, false, buf.dout.as_ptr(), dv, 1, buf.v.as_ptr(), 1, dv);
        }
        if kind == MASKED {
            self.plan.apply_mask(b, q0, k0, lq, lk, p, lk);
        }
        let mul = self.scale * LOG2_E;
        for r in 0..lq {
            let row = &mut p[r * lk..(r + 1) * lk];
            row.iter_mut().for_each(|x| *x *= mul);
            if buf.lse[r] == f32::NEG_INFINITY {
                row.fill(0.0);
            } else {
                exp2_shift_sum(row, buf.lse[r]);
            }
            for c in 0..lk {
                dp[r * lk + c] = row[c] * (dp[r * lk + c] - buf.delta[r]);
            }
        }
    }

    fn dq_block(&self, dq: &View, task: usize, buf: &mut BackwardBuffers) {
        let (plan, d) = (self.plan, self.dims.d);
        let mq = plan.q_offsets.len() - 1;
        let (bh, i) = (task / mq, task % mq);
        let (b, h) = (bh / self.dims.heads, bh % self.dims.heads);
        let (q0, lq) = self.load_query_block(b, h, i, buf);
        buf.acc_a[..lq * d].fill(0.0);
        for e in plan.indptr[i]..plan.indptr[i + 1] {
            let (k0, lk) = self.load_key_block(b, h, plan.indices[e], buf);
            self.probabilities(b, q0, lq, k0, lk, plan.kinds[e], buf);
            // dq += dS · k
            unsafe { matmul(lq, d, lk, buf.acc_a.as_mut_ptr(), d, true, buf.dp.as_ptr(), lk, 1, buf.k.as_ptr(), d, 1) };
        }
        for r in 0..lq {
            let row = &mut buf.acc_a[r * d..(r + 1) * d];
            row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: q_perm is a permutation: one writer per row.
            unsafe { dq.store_row(&[b, h, plan.q_perm[q0 + r]], row) };
        }
    }

    fn dkv_block(&self, dk: &View, dv_out: &View, task: usize, buf: &mut BackwardBuffers) {
        let mk = self.plan.k_offsets.len() - 1;
        let (bh, j) = (task / mk, task % mk);
        self.key_block(dk, dv_out, bh, j, buf, None);
    }

    /// dk, dv of key block `j` of slice `bh` over the query blocks listing it, written out; with `dq_acc` (the
    /// slice's dq rows in query layout order, f32, unscaled) also adds `dS · k` to the rows of every query block.
    fn key_block(&self, dk: &View, dv_out: &View, bh: usize, j: usize, buf: &mut BackwardBuffers,
                 mut dq_acc: Option<&mut [f32]>) {
        let (plan, d, dv) = (self.plan, self.dims.d, self.dims.dv);
        let (b, h) = (bh / self.dims.heads, bh % self.dims.heads);
        let (k0, lk) = self.load_key_block(b, h, j, buf);
        buf.acc_a[..lk * d].fill(0.0);
        buf.acc_b[..lk * dv].fill(0.0);
        for e in plan.t_indptr[j]..plan.t_indptr[j + 1] {
            let (q0, lq) = self.load_query_block(b, h, plan.t_indices[e], buf);
            self.probabilities(b, q0, lq, k0, lk, plan.t_kinds[e], buf);
            // SAFETY: the buffers hold lq x lk, lq x dv, lq x d, lk x d and lk x dv values; dq_acc holds every
            // query position of the slice (checked by the caller), so rows q0..q0+lq are inside it.
            unsafe {
                // dv += Pᵀ · dout ; dk += dSᵀ · q
                matmul(lk, dv, lq, buf.acc_b.as_mut_ptr(), dv, true, buf.p.as_ptr(), 1, lk, buf.dout.as_ptr(), dv, 1);
                matmul(lk, d, lq, buf.acc_a.as_mut_ptr(), d, true, buf.dp.as_ptr(), 1, lk, buf.q.as_ptr(), d, 1);
                if let Some(acc) = dq_acc.as_deref_mut() {
                    // dq += dS · k
                    let rows = &mut acc[q0 * d..(q0 + lq) * d];
                    matmul(lq, d, lk, rows.as_mut_ptr(), d, true, buf.dp.as_ptr(), lk, 1, buf.k.as_ptr(), d, 1);
                }
            }
        }
        for r in 0..lk {
            let token = plan.k_perm[k0 + r];
            let dk_row = &mut buf.acc_a[r * d..(r + 1) * d];
            dk_row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: k_perm is a permutation: one writer per row.
            unsafe {
                dk.store_row(&[b, h, token], dk_row);
                dv_out.store_row(&[b, h, token], &buf.acc_b[r * dv..(r + 1) * dv]);
            }
        }
    }

    /// The whole backward of slice `bh` in one pass over its key blocks (5 GEMMs per block pair instead of the
    /// two-pass 7): the task owns every dq row of the slice, accumulated in `dq_acc` and written at the end.
    fn slice_backward(&self, dq: &View, dk: &View, dv_out: &View, bh: usize, buf: &mut BackwardBuffers,
                      dq_acc: &mut Vec<f32>) {
        let (plan, d) = (self.plan, self.dims.d);
        let nq = plan.q_perm.len();
        dq_acc.clear();
        dq_acc.resize(nq * d, 0.0);
        for j in 0..plan.k_offsets.len() - 1 {
            self.key_block(dk, dv_out, bh, j, buf, Some(dq_acc.as_mut_slice()));
        }
        let (b, h) = (bh / self.dims.heads, bh % self.dims.heads);
        for (position, row) in dq_acc.chunks_exact_mut(d).enumerate() {
            row.iter_mut().for_each(|x| *x *= self.scale);
            // SAFETY: q_perm is a permutation and this task owns slice bh: one writer per row.
            unsafe { dq.store_row(&[b, h, plan.q_perm[position]], row) };
        }
    }
}
