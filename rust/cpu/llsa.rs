//! LLSA kernels on CPU: log-linear sparse attention over a data-dependent selection (each query block attends
//! its top-K fine key blocks and, at every coarser level, the pooled tokens that a hierarchical top-K kept).
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
//! ancestors' pooled gradients times its weight in them (the mean-pool backward of the pooling rule: over the
//! ancestor's count pooling fine tokens, over the product of the ancestors' numbers of children pooling children). Every output row has one writer and
//! nothing needs atomics. Reads and writes go through validated views and plans; gathers copy rows into f32
//! buffers for the GEMMs, except in the f32 forward with room for a slice copy, whose fine blocks the lane kernels
//! (`fine`) read in place.

mod backward;
mod fine;
mod forward;
mod plan;
mod select;
#[cfg(test)]
mod tests;

pub use backward::{backward, Grads, Upstream};
pub use forward::forward;
pub use plan::{Plan, Pooling};
pub use select::{select, zorder_pool, Level};

use super::common::{active_isa, check_input, gather, zeros, Dims};
use super::view::{err, View, ViewError};

/// The attention inputs: fine `q, k (B, H, N, D)`, `v (B, H, N, Dv)` and pooled `kp (B, H, P, D)`, `vp (B, H, P, Dv)`.
pub struct Inputs<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub kp: &'a View,
    pub vp: &'a View,
}

impl Inputs<'_> {
    /// Checks ranks, dtypes and that every shape agrees with q's and with the plan (`P` is
    /// `plan.pooled_tokens()`).
    fn dims(&self, plan: &Plan) -> Result<Dims, ViewError> {
        active_isa()?;
        self.q.expect(4, true)?;
        self.v.expect(4, true)?;
        let [batch, heads, n, d] = self.q.shape()[..] else { unreachable!("4 dims checked") };
        let (pooled, dv) = (plan.pooled_tokens(), self.v.shape()[3]);
        let expected: [(&View, [usize; 4]); 4] = [
            (self.k, [batch, heads, n, d]),
            (self.v, [batch, heads, n, dv]),
            (self.kp, [batch, heads, pooled, d]),
            (self.vp, [batch, heads, pooled, dv]),
        ];
        for (t, shape) in expected {
            check_input(t, &shape, self.q.dtype())?;
        }
        if d == 0 || dv == 0 {
            return err("head dims must be >= 1");
        }
        if n != plan.n || batch * heads != plan.batch_heads {
            return err(format!("plan (N={}, B*H={}) does not match q {:?}", plan.n, plan.batch_heads, self.q.shape()));
        }
        Ok(Dims { batch, heads, n, d, dv })
    }
}

/// Reads internal positions `[row0, row0 + rows)` of `(b, h)` of a fine tensor (through `plan.row`) into `dst`
/// (`rows x W`), times `mul`.
fn gather_rows(t: &View, plan: &Plan, (b, h): (usize, usize), (row0, rows): (usize, usize), mul: f32, dst: &mut [f32]) {
    gather(t, (b, h), (row0..row0 + rows).map(|r| plan.row(r)), mul, dst);
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
    fn new(cap: usize, d: usize, dv: usize) -> Result<Self, ViewError> {
        Ok(KeyRows { k: zeros(cap * d)?, v: zeros(cap * dv)?, bias: zeros(cap)?, len: 0 })
    }

    /// The fine blocks `ids` of `(b, h)` (their rows through `plan.row`).
    fn gather_fine(&mut self, inp: &Inputs, plan: &Plan, dims: Dims, b: usize, h: usize, ids: &[u32]) {
        self.len = 0;
        for &p in ids {
            let (r0, rows) = plan.fine_block(p as usize);
            self.push(inp.k, inp.v, dims, b, h, (r0..r0 + rows).map(|r| plan.row(r)));
        }
    }

    /// The fine blocks `ids` out of one slice's keys and values already in internal order (`slice`, see
    /// `forward`): each block a contiguous run.
    fn gather_fine_in_order(&mut self, (k, v): (&[f32], &[f32]), plan: &Plan, dims: Dims, ids: &[u32]) {
        let (d, dv) = (dims.d, dims.dv);
        self.len = 0;
        for &p in ids {
            let (r0, rows) = plan.fine_block(p as usize);
            let at = self.len;
            self.k[at * d..(at + rows) * d].copy_from_slice(&k[r0 * d..(r0 + rows) * d]);
            self.v[at * dv..(at + rows) * dv].copy_from_slice(&v[r0 * dv..(r0 + rows) * dv]);
            self.len += rows;
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
    fn push(&mut self, k: &View, v: &View, dims: Dims, b: usize, h: usize, rows: impl Iterator<Item = usize> + Clone) {
        let at = self.len;
        self.len += k.load_rows(&[b, h], rows.clone(), &mut self.k[at * dims.d..]);
        v.load_rows(&[b, h], rows, &mut self.v[at * dims.dv..]);
    }
}
