//! CLEAR on CPU without blocks of keys: each tile of 16 queries (4×4 image tokens, or 16 text tokens) attends
//! exactly the contiguous key ranges of its discs, read in place from the raster order (`geometry`), with the
//! queries in the lanes of two vectors (`lanes`). Computed pairs exceed the needed ones only by the union of the
//! tile's discs (1.47× at r = 8 and 1.21× at r = 16 on a 64×64 grid), against 2–3× for the block engine's tiles.
//!
//! Layouts: q, k `(B, H, N, D)`, v `(B, H, N, Dv)`, global tokens `kg (B, H, G, D)`, `vg (B, H, G, Dv)`, any
//! strides, f32 / f16 / bf16. Per `(b, h)` slice the keys are read as f32 rows: the input itself when it is f32 with
//! consecutive rows, else converted once. With bf16 inputs on a CPU with AVX-512 BF16, every product is a bf16
//! dot product summed in f32: the logits (and the backward's dP) on the inputs' own rows, P·V (and dS·k) on pairs
//! of consecutive keys, the key gradients on pairs of lanes, with P and dS rounded to bf16. Softmax in base 2, f32
//! accumulation. The forward parallelises over the tiles of each slice; the backward (`backward`) owns the key
//! gradients per task.

mod backward;
mod forward;
mod geometry;
#[cfg(test)]
mod tests;

pub use backward::{backward, Grads, Upstream};
pub use forward::forward;
pub use geometry::{computed_pairs, Geometry};

use super::lanes::{self, Lanes, PairLanes, LANES};

use std::borrow::Cow;

use super::common::{check_input, Dims};
use super::isa::{Isa, Level};
use super::view::{err, DType, View, ViewError};
use crate::alloc;
/// Keys per piece: logits of a tile for this many keys stay in L1 (16 KiB).
const PIECE_KEYS: usize = 256;

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

/// One slice's keys as rows: key `i < N` is row `i` of k / v, key `N + g` is global token `g`. The f32 rows are the
/// input's own memory when it is f32 with consecutive rows and there are no global tokens, else converted copies;
/// the bf16 rows (for bf16 dot products) are always the input's own.
struct SliceKeys<'a> {
    k_rows: Cow<'a, [f32]>,
    v_rows: Cow<'a, [f32]>,
    k_bf16: Option<&'a [u16]>,
    v_bf16: Option<&'a [u16]>,
    /// k and v as bf16 key pairs (`Form::Pairs`), empty otherwise: `v_pairs[m·Dv + c]` holds `v[2m][c]` in its
    /// low half and `v[2m + 1][c]` in its high half (0 past the last key).
    k_pairs: Vec<u32>,
    v_pairs: Vec<u32>,
}

/// The forms in which a pass reads k or v: f32 rows, bf16 rows, or bf16 rows and bf16 pairs of consecutive keys
/// (the right side of bf16 products summed over keys). A bf16 form is asked for only where the CPU has bf16 dot
/// products, the input is bf16 with an even head dim and there are no global tokens; when its rows are not
/// consecutive in memory, f32 rows stand in for them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    F32,
    Bf16,
    Pairs,
}

impl<'a> SliceKeys<'a> {
    /// Slice `(b, h)`'s keys in the forms `[k, v]` (f32 copies allocated fallibly: they scale with N), reusing the
    /// buffers of `spare` (an earlier slice's keys of the same call) where it has them.
    fn load(inp: &Inputs<'a>, geo: &Geometry, dims: Dims, (b, h): (usize, usize), forms: [Form; 2], spare: Option<SliceKeys<'a>>) -> Result<Self, ViewError> {
        let (k_spare, v_spare, mut k_pairs, mut v_pairs) = match spare {
            Some(s) => (s.k_rows, s.v_rows, s.k_pairs, s.v_pairs),
            None => (Cow::Owned(Vec::new()), Cow::Owned(Vec::new()), Vec::new(), Vec::new()),
        };
        let (k_rows, k_bf16) = key_rows(inp.k, inp.global.map(|g| g.0), geo, dims.d, (b, h), forms[0], k_spare)?;
        let (v_rows, v_bf16) = key_rows(inp.v, inp.global.map(|g| g.1), geo, dims.dv, (b, h), forms[1], v_spare)?;
        for (form, bits, channels, pairs) in [(forms[0], k_bf16, dims.d, &mut k_pairs), (forms[1], v_bf16, dims.dv, &mut v_pairs)] {
            pairs.clear();
            if let (Form::Pairs, Some(bits)) = (form, bits) {
                key_pairs(bits, channels, pairs)?;
            }
        }
        Ok(SliceKeys { k_rows, v_rows, k_bf16, v_bf16, k_pairs, v_pairs })
    }
}

/// Whether the products of lanes loaded from `lanes_of` with the rows of `keys` (`channels` each) run as bf16 dot
/// products: the level in use has them, both inputs are bf16 (so exact in bf16: only the f32 sums differ from the
/// f32 path), the channels pair up, and there are no global tokens (whose rows live apart).
fn bf16_products(isa: Isa, lanes_of: &View, keys: &View, channels: usize, global: bool) -> bool {
    cfg!(target_arch = "x86_64")
        && isa.level() >= Level::Avx512Bf16
        && lanes_of.dtype() == DType::BF16
        && keys.dtype() == DType::BF16
        && channels % 2 == 0
        && !global
}

/// The rows of `t` (and `global`) in `form`: f32 rows (empty when bf16 ones are asked for and are there) and the
/// bf16 rows when asked for and consecutive in memory.
fn key_rows<'a>(
    t: &'a View,
    global: Option<&View>,
    geo: &Geometry,
    channels: usize,
    (b, h): (usize, usize),
    form: Form,
    spare: Cow<'a, [f32]>,
) -> Result<(Cow<'a, [f32]>, Option<&'a [u16]>), ViewError> {
    let bf16 = if form == Form::F32 { None } else { t.bf16_rows(&[b, h, 0], geo.tokens()) };
    if bf16.is_some() {
        return Ok((spare, bf16));
    }
    Ok((slice_rows(t, global, geo, channels, (b, h), spare)?, bf16))
}

/// `out[m·channels + c]` = the bf16 bits of `rows[2m][c]` (low half) and `rows[2m + 1][c]` (high half, 0 past
/// the last row), for rows of `channels` values.
pub(crate) fn key_pairs(rows: &[u16], channels: usize, out: &mut Vec<u32>) -> Result<(), ViewError> {
    let keys = rows.len() / channels;
    alloc::resize(out, keys.div_ceil(2) * channels, 0)?;
    let (pairs, last) = rows[..keys * channels].split_at(keys / 2 * 2 * channels);
    for (pair, dst) in pairs.chunks_exact(2 * channels).zip(out.chunks_exact_mut(channels)) {
        let (lo, hi) = pair.split_at(channels);
        for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
            *d = u32::from(a) | (u32::from(b) << 16);
        }
    }
    if !last.is_empty() {
        for (d, &a) in out[keys / 2 * channels..].iter_mut().zip(last) {
            *d = u32::from(a);
        }
    }
    Ok(())
}

/// Slice `(b, h)`'s `keys x channels` rows of `t` followed by those of `global`, in f32: borrowed from `t` when it
/// is f32 with consecutive rows and `global` is `None`, else converted into `spare`'s buffer.
fn slice_rows<'a>(
    t: &'a View,
    global: Option<&View>,
    geo: &Geometry,
    channels: usize,
    (b, h): (usize, usize),
    spare: Cow<'a, [f32]>,
) -> Result<Cow<'a, [f32]>, ViewError> {
    let n = geo.tokens();
    if global.is_none() {
        if let Some(rows) = t.f32_rows(&[b, h, 0], n) {
            return Ok(Cow::Borrowed(rows));
        }
    }
    let mut rows = match spare {
        Cow::Owned(buf) => buf,
        Cow::Borrowed(_) => Vec::new(),
    };
    // Every value is overwritten below: no need to clear what an earlier slice left.
    alloc::resize(&mut rows, geo.keys() * channels, 0.0)?;
    t.load_rows(&[b, h], 0..n, &mut rows);
    if let Some(g) = global {
        g.load_rows(&[b, h], 0..geo.global, &mut rows[n * channels..]);
    }
    Ok(Cow::Owned(rows))
}

/// One `(b, h)` slice as the tile functions see it: its keys in f32, the shapes, and the softmax scale.
struct Slice<'a> {
    keys: &'a SliceKeys<'a>,
    dims: Dims,
    b: usize,
    h: usize,
    scale: f32,
}

/// `out[j]` = the lanes times key `start + j`, `j < len` (keys as rows of `channels`): bf16 dot products of the lane
/// pairs `pairs` on the bf16 rows when given (only the AVX-512 clone gets them), times `mul` after; else f32 dots
/// of `lanes` (already times `mul`) on the f32 `rows`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn key_products<const FMA: bool, const W: usize>(
    (lanes, pairs): (&[Lanes], &[PairLanes]),
    (rows, rows_bf16): (&[f32], Option<&[u16]>),
    channels: usize,
    (start, len): (usize, usize),
    mul: f32,
    out: &mut [Lanes],
) {
    match rows_bf16 {
        #[cfg(target_arch = "x86_64")]
        Some(bits) => {
            // SAFETY: bf16 rows are loaded only on the `Avx512Bf16` level (`bf16_products`), whose features (AVX-512
            // F, BW, BF16) this CPU has.
            unsafe { lanes::dots_bf16(pairs, &bits[start * channels..], channels, len, out) };
            if mul != 1.0 {
                lanes::scale_rows::<W>(&mut out[..len], &[mul; LANES]);
            }
        }
        _ => lanes::dots::<FMA, W>(lanes, &rows[start * channels..], channels, len, out),
    }
}

/// A segment's keys in pieces of at most `PIECE_KEYS`: `(first key, len)` per piece.
fn pieces(seg: &geometry::Segment) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..seg.len).step_by(PIECE_KEYS).map(move |o| (seg.start + o, PIECE_KEYS.min(seg.len - o)))
}
