//! A query block's fine attention on the lane kernels (`lanes`): its logits against the selected fine key blocks
//! and P·V over them, 16 queries at a time in the lanes of a vector, reading the keys and values as rows in place
//! from the slice's f32 copy in internal order (no gather of the selected blocks, no packing by a GEMM).

use crate::cpu::common::zeros;
use crate::cpu::lanes::{self, Lanes, LANES};
use crate::cpu::view::ViewError;

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

crate::isa_dispatch!(pub fn logits(q: &[f32], d: usize, keys: &[f32], blocks: Blocks, sf: &mut [f32], rf: usize, scratch: &mut Scratch) = logits_body);
crate::isa_dispatch!(pub fn weighted_values(sf: &[f32], rf: usize, values: &[f32], dv: usize, blocks: Blocks, out: &mut [f32], scratch: &mut Scratch) = values_body);

/// `sf[r·rf + i] = q[r] · key i` for the `sf.len() / rf` query rows of `q` (rows of `d`) and the `rf` keys of
/// `blocks` in order (rows of `d` in `keys`).
#[inline(always)]
fn logits_body<const FMA: bool, const W: usize>(q: &[f32], d: usize, keys: &[f32], blocks: Blocks, sf: &mut [f32], rf: usize, scratch: &mut Scratch) {
    let rows = sf.len() / rf;
    for t0 in (0..rows).step_by(LANES) {
        let live = (rows - t0).min(LANES);
        for (c, lanes) in scratch.qt.iter_mut().enumerate() {
            for (l, x) in lanes.iter_mut().enumerate() {
                *x = if l < live { q[(t0 + l) * d + c] } else { 0.0 };
            }
        }
        let mut at = 0;
        for &(r0, len) in blocks {
            lanes::dots::<FMA, W>(&scratch.qt, &keys[r0 * d..], d, len, &mut scratch.s[at..]);
            at += len;
        }
        for (i, s) in scratch.s[..rf].iter().enumerate() {
            for (l, x) in s.iter().enumerate().take(live) {
                sf[(t0 + l) * rf + i] = *x;
            }
        }
    }
}

/// `out[r·dv + c] = Σ_i sf[r·rf + i] · value i [c]` for the `sf.len() / rf` query rows, over the `rf` values of
/// `blocks` in order (rows of `dv` in `values`).
#[inline(always)]
fn values_body<const FMA: bool, const W: usize>(sf: &[f32], rf: usize, values: &[f32], dv: usize, blocks: Blocks, out: &mut [f32], scratch: &mut Scratch) {
    let rows = sf.len() / rf;
    for t0 in (0..rows).step_by(LANES) {
        let live = (rows - t0).min(LANES);
        for (i, s) in scratch.s[..rf].iter_mut().enumerate() {
            for (l, x) in s.iter_mut().enumerate() {
                *x = if l < live { sf[(t0 + l) * rf + i] } else { 0.0 };
            }
        }
        scratch.acc.iter_mut().for_each(|a| *a = [0.0; LANES]);
        let mut at = 0;
        for &(r0, len) in blocks {
            lanes::combine::<FMA, W>(&scratch.s[at..at + len], &values[r0 * dv..], dv, &mut scratch.acc);
            at += len;
        }
        for l in 0..live {
            for (c, a) in scratch.acc.iter().enumerate() {
                out[(t0 + l) * dv + c] = a[l];
            }
        }
    }
}
