//! A query block's fine attention on the lane kernels (`lanes`): its logits against the selected fine key blocks,
//! the softmax they share with the pooled logits, and P·V over them, 16 queries at a time in the lanes of a
//! vector, reading the keys and values as rows in place from the slice's f32 copy in internal order (no gather of
//! the selected blocks, no packing by a GEMM).

use crate::cpu::common::zeros;
use crate::cpu::lanes::{self, Lanes, LANES};
use crate::cpu::view::ViewError;
use crate::cpu::vmath::{self, exp2_shift_sum};

/// Per-worker buffers: 16 queries channel-major, logits or probabilities of their keys, output accumulators.
pub struct Scratch {
    qt: Vec<Lanes>,
    s: Vec<Lanes>,
    acc: Vec<Lanes>,
}

impl Scratch {
    /// For head dims `d`, `dv` and up to `keys` fine keys per query block.
    pub fn new(d: usize, dv: usize, keys: usize) -> Result<Self, ViewError> {
        Ok(Scratch { qt: zeros(d)?, s: zeros(keys)?, acc: zeros(dv)? })
    }
}

/// The fine key blocks of one query block: `(first row, rows)` in the slice's internal order.
pub type Blocks<'a> = &'a [(usize, usize)];

crate::isa_dispatch!(pub fn attend(fine: Fine, pooled: Pooled, out: Rows, scratch: &mut Scratch) = attend_body);

/// A query block's queries and its fine keys: `q` (rows of `d`, pre-scaled so that logits are in log2 units),
/// the slice's `keys` (rows of `d`) and `values` (rows of `dv`) in internal order, and the selected `blocks`.
pub struct Fine<'a> {
    pub q: &'a [f32],
    pub d: usize,
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub dv: usize,
    pub blocks: Blocks<'a>,
}

/// The same query rows' logits against the pooled keys (rows of `rp`, log2 units, bias added), turned into
/// probabilities (unnormalised, shifted by the row's maximum) here.
pub struct Pooled<'a> {
    pub logits: &'a mut [f32],
    pub rp: usize,
}

/// Per query row: the unnormalised P·V over the fine keys (`acc`, rows of `dv`), the maximum logit over fine and
/// pooled keys (`m`) and the sum of the probabilities (`l`).
pub struct Rows<'a> {
    pub acc: &'a mut [f32],
    pub m: &'a mut [f32],
    pub l: &'a mut [f32],
}

/// Fine logits of the `m.len()` query rows, one softmax per row over its fine and pooled logits (maximum `m`,
/// sum `l`, the pooled logits replaced by their probabilities), and `acc = P·V` over the fine keys. The fine
/// logits stay in the lanes of the 16 queries from the logits to P·V: no round trip through rows.
#[inline(always)]
fn attend_body<const FMA: bool, const W: usize>(fine: Fine, pooled: Pooled, out: Rows, scratch: &mut Scratch) {
    let Fine { q, d, keys, values, dv, blocks } = fine;
    let rows = out.m.len();
    let rf: usize = blocks.iter().map(|b| b.1).sum();
    for t0 in (0..rows).step_by(LANES) {
        let live = (rows - t0).min(LANES);
        lanes::rows_to_lanes::<W>(&q[t0 * d..], d, live, 1.0, &mut scratch.qt);
        let s = &mut scratch.s[..rf];
        let mut at = 0;
        for &(r0, len) in blocks {
            lanes::dots::<FMA, W>(&scratch.qt, &keys[r0 * d..], d, len, &mut s[at..]);
            at += len;
        }
        let fine_max = lanes::max_lanes::<W>(s);
        // Dead lanes (no query) keep shift 0: their logits are 0 and their results unused.
        let mut shift = [0.0f32; LANES];
        for l in 0..live {
            let pooled_row = &pooled.logits[(t0 + l) * pooled.rp..][..pooled.rp];
            shift[l] = fine_max[l].max(vmath::max(pooled_row));
        }
        let fine_sums = lanes::exp2_shift::<FMA, W>(s, &shift);
        for l in 0..live {
            let pooled_row = &mut pooled.logits[(t0 + l) * pooled.rp..][..pooled.rp];
            out.l[t0 + l] = fine_sums[l] + exp2_shift_sum(pooled_row, shift[l]);
            out.m[t0 + l] = shift[l];
        }
        scratch.acc.iter_mut().for_each(|a| *a = [0.0; LANES]);
        let mut at = 0;
        for &(r0, len) in blocks {
            lanes::combine::<FMA, W>(&s[at..at + len], &values[r0 * dv..], dv, &mut scratch.acc);
            at += len;
        }
        lanes::lanes_to_rows::<W>(&scratch.acc, &[1.0; LANES], live, &mut out.acc[t0 * dv..], dv);
    }
}
