//! CLEAR on CPU without blocks of keys: each tile of 16 queries (4×4 image tokens, or 16 text tokens) attends
//! exactly the contiguous key ranges of its discs, read in place from the raster order (`geometry`), with the
//! queries in the lanes of two vectors (`lanes`). Computed pairs exceed the needed ones only by the union of the
//! tile's discs (1.47× at r = 8 and 1.21× at r = 16 on a 64×64 grid), against 2–3× for the block engine's tiles.
//!
//! Layouts: q, k `(B, H, N, D)`, v `(B, H, N, Dv)`, global tokens `kg (B, H, G, D)`, `vg (B, H, G, Dv)`, any
//! strides, f32 / f16 / bf16. Per `(b, h)` slice the keys are converted once to f32 panels (transposed per group
//! of consecutive keys, for the logits) and rows (for P·V). Softmax in base 2, f32 accumulation. The forward
//! parallelises over the tiles of each slice; the backward (`backward`) owns the key gradients per task.

mod backward;
mod forward;
mod geometry;
mod lanes;
#[cfg(test)]
mod tests;

pub use backward::{backward, Grads, Upstream};
pub use forward::forward;
pub use geometry::{computed_pairs, Geometry};

use geometry::Group;

use super::common::{check_input, zeros, Dims};
use super::view::{err, View, ViewError};
/// Keys per piece: logits of a tile for this many keys stay in L1 (16 KiB).
const PIECE_KEYS: usize = 256;
/// Rows of logit buffers: a piece plus the overrun of [`lanes::dots`]' last block.
const PIECE_ROWS: usize = PIECE_KEYS + lanes::DOTS_OVERRUN;

/// The attention inputs; `global = Some((kg, vg))` adds keys every image query attends.
pub struct Inputs<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub global: Option<(&'a View, &'a View)>,
}

/// `x` rounded up to a multiple of `w`, the vector width: the row length of the key-gradient buffers for `x`
/// channels (see [`lanes::update`]).
fn padded(x: usize, w: usize) -> usize {
    x.div_ceil(w) * w
}

/// Checks the inputs (any float dtypes) against each other and the grid; `Dims::n` is the sequence length.
fn check_inputs(inp: &Inputs, geo: &Geometry) -> Result<Dims, ViewError> {
    for t in [inp.q, inp.k, inp.v] {
        t.expect(4, true)?;
    }
    let [batch, heads, n, d] = inp.q.shape()[..] else { return err("q: expected 4 dims") };
    if n != geo.tokens() {
        return err(format!("q: {n} tokens but the grid has {}", geo.tokens()));
    }
    if d == 0 {
        return err("q: head dim must be positive");
    }
    check_input(inp.k, &[batch, heads, n, d], None)?;
    let dv = inp.v.shape()[3];
    if dv == 0 {
        return err("v: head dim must be positive");
    }
    check_input(inp.v, &[batch, heads, n, dv], None)?;
    match inp.global {
        Some((kg, vg)) => {
            check_input(kg, &[batch, heads, geo.global, d], None)?;
            check_input(vg, &[batch, heads, geo.global, dv], None)?;
        }
        None if geo.global > 0 => return err("global: the geometry has global tokens but none were given"),
        None => {}
    }
    if geo.max_d2 < 0 || geo.max_dt < 0 {
        return err("max_d2 and max_dt must be >= 0");
    }
    Ok(Dims { batch, heads, n, d, dv })
}

/// One slice's keys in f32: `k` as panels (per group, channel-major) and, for the backward, as rows; `v` as rows
/// and, for the backward, as panels. Key `i < N` is row `i` of k / v, key `N + g` is global token `g`.
struct SliceKeys {
    k_panels: Vec<f32>,
    k_rows: Vec<f32>,
    v_rows: Vec<f32>,
    v_panels: Vec<f32>,
}

impl SliceKeys {
    /// Slice `(b, h)`'s keys (allocated fallibly: they scale with N).
    fn load(
        inp: &Inputs,
        geo: &Geometry,
        groups: &[Group],
        dims: Dims,
        b: usize,
        h: usize,
        backward: bool,
    ) -> Result<Self, ViewError> {
        let keys = geo.keys();
        let (d, dv) = (dims.d, dims.dv);
        let mut k_rows = zeros(keys * d)?;
        let mut v_rows = zeros(keys * dv)?;
        let n = geo.tokens();
        inp.k.load_rows(&[b, h], 0..n, &mut k_rows);
        inp.v.load_rows(&[b, h], 0..n, &mut v_rows);
        if let Some((kg, vg)) = inp.global {
            kg.load_rows(&[b, h], 0..geo.global, &mut k_rows[n * d..]);
            vg.load_rows(&[b, h], 0..geo.global, &mut v_rows[n * dv..]);
        }
        let k_panels = panels(&k_rows, d, groups)?;
        let v_panels = if backward { panels(&v_rows, dv, groups)? } else { Vec::new() };
        let k_rows = if backward { k_rows } else { Vec::new() };
        Ok(SliceKeys { k_panels, k_rows, v_rows, v_panels })
    }
}

/// One `(b, h)` slice as the tile functions see it: its keys in f32, the shapes, and the softmax scale.
struct Slice<'a> {
    keys: &'a SliceKeys,
    dims: Dims,
    b: usize,
    h: usize,
    scale: f32,
}

/// Rows `(keys, channels)` regrouped per group as `(channels, width)` panels, plus zeros that the last block of
/// [`lanes::dots`] may read past the last group.
fn panels(rows: &[f32], channels: usize, groups: &[Group]) -> Result<Vec<f32>, ViewError> {
    let mut out = zeros(rows.len() + lanes::DOTS_OVERRUN)?;
    for g in groups {
        let panel = &mut out[g.start * channels..(g.start + g.width) * channels];
        for j in 0..g.width {
            let row = &rows[(g.start + j) * channels..][..channels];
            for (c, x) in row.iter().enumerate() {
                panel[c * g.width + j] = *x;
            }
        }
    }
    Ok(out)
}

/// A segment's keys in pieces of at most `PIECE_KEYS`: `(first key, len)` per piece.
fn pieces(seg: &geometry::Segment) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..seg.len).step_by(PIECE_KEYS).map(move |o| (seg.start + o, PIECE_KEYS.min(seg.len - o)))
}

/// Offset in a panel buffer of key `key` (in the segment's group), for `channels` values per key.
fn panel_offset(seg: &geometry::Segment, key: usize, channels: usize) -> usize {
    seg.group_start * channels + (key - seg.group_start)
}
