//! LLSA kernels on CPU: log-linear sparse attention over a data-dependent selection (`specs/llsa.md`).
//!
//! Keys live in two tensors: the fine tokens `k, v (B, H, N, ·)` (any strides) and the pooled tokens of every level
//! concatenated, `kp, vp (B, H, P, ·)`, `P = n_1 + … + n_L`. A key *block* is `block` consecutive tokens of one level
//! (the children of one coarser token): fine block `p` is rows `[p·b, min((p+1)·b, N))`, pooled block `p` is rows
//! `[pb_offsets[p], pb_offsets[p+1])` of `kp`. Pooled token `t` enters every logit with `+log2(count)` (`pbias`).
//!
//! Each fine query block `j` attends, in one softmax, to its `K_1` fine blocks (`fine[j]`) and its pooled blocks
//! (`pooled[j]`: the candidates of every intermediate level and all coarsest tokens). Consecutive query blocks with
//! the same pooled blocks (siblings) form a *group*: their pooled logits are one GEMM, and in the backward their
//! pooled-key gradients are reduced in the same task. Softmax in base 2, f32 accumulation, f32/f16/bf16 storage.
//!
//! Selection (`select`): the hierarchical top-K over the pooled q and k, written as int64 ids per level; its
//! inputs come from `permute_pool` (the pooled pyramid of q, k, v in Z-order, with or without the gathered copy).
//! With a Z-order, the plan carries it (`Plan::with_rows`) and the kernels read q, k, v, dout, out and write out, dq,
//! dk, dv through it, so no permuted copy of any of them is made.
//!
//! Backward (`backward`): with enough `(b, h)` slices per thread, one pass per slice computes dq and every key
//! gradient from each pair's P and dS made once; otherwise dq and the pooled keys' gradients per group (tasks own a
//! range of groups and a partial sum of the pooled gradients, reduced at the end), then `dk`, `dv` per fine key
//! block over the transposed selection (CSR: counts, prefix sum, fill). Either way each row adds its level-l
//! ancestors' pooled gradients over their counts (the mean-pool backward). Every output row has one writer and
//! nothing needs atomics. The kernels' only `unsafe`
//! reads and writes go through validated views and plans; gathers copy rows into f32 buffers for the `gemm` crate.

mod backward;
mod forward;
mod plan;
mod select;
#[cfg(test)]
mod tests;

pub use backward::{backward, Grads, Upstream};
pub use forward::forward;
pub use plan::Plan;
pub use select::{select, zorder_pool, Level};

use super::view::{err, DType, View, ViewError};

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN_2: f32 = std::f32::consts::LN_2;

/// The attention inputs: fine `q, k (B, H, N, D)`, `v (B, H, N, Dv)` and pooled `kp (B, H, P, D)`, `vp (B, H, P, Dv)`.
pub struct Inputs<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub kp: &'a View,
    pub vp: &'a View,
}

/// Shapes shared by the passes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    n: usize,
    pooled: usize,
    d: usize,
    dv: usize,
}

impl Inputs<'_> {
    /// Checks ranks, dtypes and that every shape agrees with q's and with the plan.
    fn dims(&self, plan: &Plan) -> Result<Dims, ViewError> {
        for t in [self.q, self.k, self.v, self.kp, self.vp] {
            t.expect(4, true)?;
            if t.dtype != self.q.dtype {
                return err(format!("{}: dtype {:?} differs from q's {:?}", t.name, t.dtype, self.q.dtype));
            }
        }
        let (batch, heads, n, d) = (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.q.shape[3]);
        let (pooled, dv) = (plan.pooled_tokens(), self.v.shape[3]);
        let expected: [(&View, [usize; 4]); 4] = [
            (self.k, [batch, heads, n, d]),
            (self.v, [batch, heads, n, dv]),
            (self.kp, [batch, heads, pooled, d]),
            (self.vp, [batch, heads, pooled, dv]),
        ];
        for (t, shape) in expected {
            if t.shape != shape {
                return err(format!("{}: expected shape {shape:?}, got {:?}", t.name, t.shape));
            }
        }
        if d == 0 || dv == 0 {
            return err("head dims must be >= 1");
        }
        if n != plan.n || batch * heads != plan.batch_heads {
            return err(format!("plan (N={}, B*H={}) does not match q {:?}", plan.n, plan.batch_heads, self.q.shape));
        }
        Ok(Dims { batch, heads, n, pooled, d, dv })
    }
}

/// An output: the given shape and dtype, contiguous (so rows of different tasks never overlap).
fn check_output(t: &View, shape: &[usize], dtype: DType) -> Result<(), ViewError> {
    if t.shape != shape || t.dtype != dtype {
        return err(format!(
            "{}: expected shape {shape:?} and dtype {dtype:?}, got {:?} {:?}",
            t.name, t.shape, t.dtype
        ));
    }
    t.expect_contiguous()
}

/// Reads internal positions `[row0, row0 + rows)` of `(b, h)` of a fine tensor (through `plan.row`) into `dst`
/// (`rows x width`), times `mul`.
#[allow(clippy::too_many_arguments)]
fn gather_rows(
    t: &View,
    plan: &Plan,
    b: usize,
    h: usize,
    row0: usize,
    rows: usize,
    width: usize,
    mul: f32,
    dst: &mut [f32],
) {
    for r in 0..rows {
        let row = &mut dst[r * width..(r + 1) * width];
        t.load_row(&[b, h, plan.row(row0 + r)], row);
        if mul != 1.0 {
            row.iter_mut().for_each(|x| *x *= mul);
        }
    }
}

/// Reads row `r` of `(b, h)` of a float view (validated, `r` in range) into `dst[c * step]`, `c < width`, as f32.
#[inline]
fn read_row(t: &View, b: usize, h: usize, r: usize, dst: &mut [f32], step: usize, width: usize) {
    assert!(width == t.shape[3] && (width == 0 || (width - 1) * step < dst.len()), "read_row: destination too small");
    let base = b * t.strides[0] + h * t.strides[1] + r * t.strides[2];
    let s = t.strides[3];
    // SAFETY: `View::new` checked that every in-shape offset fits the allocation it describes; callers pass
    // b, h, r inside the shape, and the assert above bounds the writes.
    unsafe {
        match t.dtype {
            DType::F32 if s == 1 && step == 1 => {
                std::ptr::copy_nonoverlapping((t.ptr as *const f32).add(base), dst.as_mut_ptr(), width);
            }
            DType::F32 => {
                let p = (t.ptr as *const f32).add(base);
                for c in 0..width {
                    *dst.get_unchecked_mut(c * step) = *p.add(c * s);
                }
            }
            DType::F16 => {
                let p = (t.ptr as *const half::f16).add(base);
                for c in 0..width {
                    *dst.get_unchecked_mut(c * step) = (*p.add(c * s)).to_f32();
                }
            }
            DType::BF16 => {
                let p = (t.ptr as *const half::bf16).add(base);
                for c in 0..width {
                    *dst.get_unchecked_mut(c * step) = (*p.add(c * s)).to_f32();
                }
            }
            _ => unreachable!("float views are checked by `Inputs::dims`"),
        }
    }
}

/// Keys and values of a list of blocks gathered into contiguous rows, with the log2-count bias of each row. The
/// GEMMs read `k` transposed through its strides (cheaper than gathering it transposed).
struct KeyRows {
    k: Vec<f32>,
    v: Vec<f32>,
    bias: Vec<f32>,
    len: usize,
}

impl KeyRows {
    fn new(cap: usize, d: usize, dv: usize) -> Self {
        KeyRows { k: vec![0.0; cap * d], v: vec![0.0; cap * dv], bias: vec![0.0; cap], len: 0 }
    }

    /// The fine blocks `ids` of `(b, h)` (their rows through `plan.row`).
    fn gather_fine(&mut self, inp: &Inputs, plan: &Plan, dims: Dims, b: usize, h: usize, ids: &[u32]) {
        self.len = 0;
        for &p in ids {
            let (r0, rows) = plan.fine_block(p as usize);
            self.push(inp.k, inp.v, dims, b, h, (r0..r0 + rows).map(|r| plan.row(r)));
        }
    }

    /// The pooled blocks `ids` of `(b, h)`, with their bias.
    fn gather_pooled(&mut self, inp: &Inputs, plan: &Plan, dims: Dims, b: usize, h: usize, ids: &[u32]) {
        self.len = 0;
        for &p in ids {
            let (r0, rows) = plan.pooled_block(p as usize);
            self.bias[self.len..self.len + rows].copy_from_slice(&plan.pbias[r0..r0 + rows]);
            self.push(inp.kp, inp.vp, dims, b, h, r0..r0 + rows);
        }
    }

    /// Appends rows `rows` (in range) of `(b, h)` of `k` and `v`.
    fn push(&mut self, k: &View, v: &View, dims: Dims, b: usize, h: usize, rows: impl Iterator<Item = usize>) {
        let (d, dv) = (dims.d, dims.dv);
        for r in rows {
            let at = self.len;
            read_row(k, b, h, r, &mut self.k[at * d..], 1, d);
            read_row(v, b, h, r, &mut self.v[at * dv..], 1, dv);
            self.len += 1;
        }
    }
}
