//! Where CLEAR's keys are, seen from a tile of 16 queries: the query tiles, and per tile the contiguous key segments
//! its queries need.
//!
//! Image tokens are in raster order, so the keys of one image row are consecutive: a query tile's disc keys are a
//! few contiguous ranges, one per key row, read in place (no gather, no permutation).

use std::sync::{Arc, Mutex, PoisonError};

use super::lanes::{Lanes, LANES};
use crate::alloc::{self, AllocError};

/// Image rows per query tile (4×4 tiles; the last rows of a frame take wider tiles).
const TILE_ROWS: usize = 4;

/// The sequence and the mask: `[text][image]` or `[image][text]`, `global` extra keys after the sequence; an image
/// pair is allowed when `dy² + dx² <= max_d2` and `|dt| <= max_dt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub text: usize,
    pub text_first: bool,
    pub global: usize,
    pub max_d2: i64,
    pub max_dt: i64,
}

impl Geometry {
    pub fn image(&self) -> usize {
        self.frames * self.height * self.width
    }

    /// Sequence length N (text and image).
    pub fn tokens(&self) -> usize {
        self.image() + self.text
    }

    /// Keys: the sequence, then the global tokens.
    pub fn keys(&self) -> usize {
        self.tokens() + self.global
    }

    fn image_start(&self) -> usize {
        if self.text_first {
            self.text
        } else {
            0
        }
    }

    fn text_start(&self) -> usize {
        if self.text_first {
            0
        } else {
            self.image()
        }
    }

    /// The largest `|dx|` of the disc's row at vertical offset `dy`, `None` outside the disc.
    fn half_width(&self, dy: i64) -> Option<i64> {
        let rest = self.max_d2.checked_sub(dy.checked_mul(dy)?)?;
        (rest >= 0).then(|| isqrt(rest))
    }
}

/// `floor(√x)` (0 for `x <= 0`), exact for every `i64`: the float estimate, corrected with squares in `i128`.
fn isqrt(x: i64) -> i64 {
    let x = x.max(0);
    let mut r = (x as f64).sqrt() as i64;
    let square = |r: i64| i128::from(r) * i128::from(r);
    while square(r) > i128::from(x) {
        r -= 1;
    }
    while square(r + 1) <= i128::from(x) {
        r += 1;
    }
    r
}

/// Where a tile's queries sit.
#[derive(Clone, Copy, Debug)]
pub enum Place {
    /// Consecutive text tokens: they see every sequence key (not the global ones).
    Text,
    /// `rows × cols` image tokens at `(t, y, x)`; lane `r·cols + c` is `(y + r, x + c)`.
    Image { t: usize, y: usize, x: usize, rows: usize, cols: usize },
}

/// Up to 16 queries computed together (one per lane). Lanes past `live` repeat lane 0.
#[derive(Clone, Copy, Debug)]
pub struct Tile {
    pub rows: [usize; LANES],
    pub live: usize,
    pub place: Place,
}

/// A geometry's query tiles and their key segments: what the forward and the backward walk.
pub struct Layout {
    pub tiles: Vec<Tile>,
    pub segments: TileSegments,
}

/// Layouts kept for reuse ([`layout`]).
const KEPT_LAYOUTS: usize = 4;

/// The [`Layout`] of `g`, shared by the calls with the same geometry: a DiT calls CLEAR with one geometry in every
/// layer, step, forward and backward, and building the segments took about 2% of a forward's time (on one thread,
/// before the tiles run in parallel). The last `KEPT_LAYOUTS` geometries' layouts are kept.
pub fn layout(g: &Geometry) -> Result<Arc<Layout>, AllocError> {
    static KEPT: Mutex<Vec<(Geometry, Arc<Layout>)>> = Mutex::new(Vec::new());
    let lock = || KEPT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, hit)) = lock().iter().find(|(kept, _)| kept == g) {
        return Ok(Arc::clone(hit));
    }
    let t = tiles(g)?;
    let segments = TileSegments::new(g, &t)?;
    let made = Arc::new(Layout { tiles: t, segments });
    let mut kept = lock();
    if kept.len() >= KEPT_LAYOUTS {
        kept.remove(0);
    }
    // A layout that cannot be kept is still returned.
    if kept.try_reserve(1).is_ok() {
        kept.push((*g, Arc::clone(&made)));
    }
    Ok(made)
}

/// Every query in tiles of 16: text in runs, image rows in 4×4 tiles (a frame's last rows in wider tiles).
fn tiles(g: &Geometry) -> Result<Vec<Tile>, AllocError> {
    let mut out = Vec::new();
    let t0 = g.text_start();
    for s in (0..g.text).step_by(LANES) {
        let live = LANES.min(g.text - s);
        let mut rows = [t0 + s; LANES];
        for (l, r) in rows.iter_mut().enumerate().take(live) {
            *r = t0 + s + l;
        }
        alloc::push(&mut out, Tile { rows, live, place: Place::Text })?;
    }
    for t in 0..g.frames {
        for y in (0..g.height).step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(g.height - y);
            let step = LANES / rows;
            for x in (0..g.width).step_by(step) {
                let cols = step.min(g.width - x);
                let first = g.image_start() + (t * g.height + y) * g.width + x;
                let mut lanes = [first; LANES];
                for r in 0..rows {
                    for c in 0..cols {
                        lanes[r * cols + c] = first + r * g.width + c;
                    }
                }
                alloc::push(&mut out, Tile { rows: lanes, live: rows * cols, place: Place::Image { t, y, x, rows, cols } })?;
            }
        }
    }
    Ok(out)
}

/// Keys `start .. start + len`; `mask`: some lane may not see all of them.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub mask: Option<RowMask>,
}

/// The disc test of a segment on one image key row: its first key's column, and per lane the key columns
/// `[lo, hi]` its disc keeps on this key row (`lo > hi`: none), as f32 (exact: grid coordinates are far below 2²⁴).
#[derive(Clone, Copy, Debug)]
pub struct RowMask {
    pub x0: i64,
    pub lo: Lanes,
    pub hi: Lanes,
}

/// Every key of `start .. start + len`, or nothing when `len` is 0.
fn whole(start: usize, len: usize) -> Option<Segment> {
    (len > 0).then_some(Segment { start, len, mask: None })
}

/// The key segments of `tile` (into `out`, cleared first): every key some lane of it may attend.
pub fn segments(g: &Geometry, tile: &Tile, out: &mut Vec<Segment>) -> Result<(), AllocError> {
    out.clear();
    let (t, y0, x0, rows, cols) = match tile.place {
        Place::Text => return alloc::extend(out, whole(0, g.tokens())),
        Place::Image { t, y, x, rows, cols } => (t, y as i64, x as i64, rows as i64, cols as i64),
    };
    alloc::extend(out, whole(g.text_start(), g.text))?;
    let reach = isqrt(g.max_d2);
    let (width, height) = (g.width as i64, g.height as i64);
    for kt in 0..g.frames {
        if (kt as i64 - t as i64).abs() > g.max_dt {
            continue;
        }
        for ky in (y0 - reach).max(0)..=(y0 + rows - 1 + reach).min(height - 1) {
            // Union of the tile rows' key ranges on this key row, and whether every row covers all of it.
            let (mut lo, mut hi, mut inner_lo, mut inner_hi, mut every_row) = (i64::MAX, i64::MIN, i64::MIN, i64::MAX, true);
            let mut half_widths = [-1i64; TILE_ROWS];
            for r in 0..rows {
                match g.half_width(ky - (y0 + r)) {
                    Some(w) => {
                        half_widths[r as usize] = w;
                        lo = lo.min(x0 - w);
                        hi = hi.max(x0 + cols - 1 + w);
                        inner_lo = inner_lo.max(x0 + cols - 1 - w);
                        inner_hi = inner_hi.min(x0 + w);
                    }
                    None => every_row = false,
                }
            }
            let (lo, hi) = (lo.max(0), hi.min(width - 1));
            if lo > hi {
                continue;
            }
            let full = every_row && inner_lo <= lo && inner_hi >= hi;
            let row_start = g.image_start() + ((kt * g.height) as i64 + ky) as usize * g.width;
            let segment = Segment {
                start: row_start + lo as usize,
                len: (hi - lo + 1) as usize,
                mask: (!full).then(|| row_mask(tile, lo, &half_widths)),
            };
            alloc::push(out, segment)?;
        }
    }
    alloc::extend(out, whole(g.tokens(), g.global))
}

/// The mask of an image tile's segment that starts at column `x0`, from the half-width of each tile row's disc
/// on the key row (−1: the key row is outside it); dead lanes repeat lane 0.
fn row_mask(tile: &Tile, x0: i64, half_widths: &[i64; TILE_ROWS]) -> RowMask {
    let (mut lo, mut hi) = ([1.0f32; LANES], [0.0f32; LANES]);
    if let Place::Image { x, rows, cols, .. } = tile.place {
        for l in 0..LANES {
            let l0 = if l < rows * cols { l } else { 0 };
            let w = half_widths[l0 / cols];
            if w >= 0 {
                let qx = (x + l0 % cols) as i64;
                lo[l] = (qx - w) as f32;
                hi[l] = (qx + w) as f32;
            }
        }
    }
    RowMask { x0, lo, hi }
}

/// The segments of every tile of a call, made once and shared by all its `(b, h)` slices.
pub struct TileSegments {
    /// Tile `t`'s segments are `all[starts[t]..starts[t + 1]]`.
    starts: Vec<usize>,
    all: Vec<Segment>,
}

impl TileSegments {
    fn new(g: &Geometry, tiles: &[Tile]) -> Result<Self, AllocError> {
        let (mut starts, mut all, mut segs) = (Vec::new(), Vec::new(), Vec::new());
        alloc::push(&mut starts, 0)?;
        for tile in tiles {
            segments(g, tile, &mut segs)?;
            alloc::extend(&mut all, segs.iter().copied())?;
            alloc::push(&mut starts, all.len())?;
        }
        Ok(TileSegments { starts, all })
    }

    /// Tile `t`'s segments.
    pub fn of(&self, t: usize) -> &[Segment] {
        &self.all[self.starts[t]..self.starts[t + 1]]
    }
}

/// (query, key) pairs the kernels compute for `g`: every lane of every tile times its segments' keys (the
/// benchmark's computed work).
pub fn computed_pairs(g: &Geometry) -> Result<u64, AllocError> {
    let mut segs = Vec::new();
    tiles(g)?.iter().try_fold(0u64, |sum, tile| {
        segments(g, tile, &mut segs)?;
        Ok(sum + (LANES * segs.iter().map(|s| s.len).sum::<usize>()) as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isqrt_is_exact_over_all_of_i64() {
        let root = 3_037_000_499i64; // floor(√i64::MAX)
        for x in [0, 1, 2, 3, 4, 15, 16, 17, 1 << 52, (1 << 52) + 1, root * root - 1, root * root, i64::MAX - 1, i64::MAX] {
            let r = isqrt(x);
            assert!(i128::from(r) * i128::from(r) <= i128::from(x) && i128::from(r + 1).pow(2) > i128::from(x), "isqrt({x}) = {r}");
        }
        assert_eq!(isqrt(i64::MAX), root);
        assert_eq!(isqrt(-5), 0);
    }

    /// Thresholds up to `i64::MAX` (beyond ~(3.04e9)² the old `isqrt` overflowed and never returned): the same
    /// segments as the grid's own reach.
    #[test]
    fn segments_take_any_threshold() {
        let geo = |max_d2: i64, max_dt: i64| Geometry {
            frames: 2, height: 9, width: 13, text: 3, text_first: false, global: 2, max_d2, max_dt,
        };
        let reach = geo(8 * 8 + 12 * 12, 1);
        for (d2, dt) in [(i64::MAX, i64::MAX), (i64::MAX - 1, 1), (3_037_000_499i64.pow(2), 7), (1 << 62, 1 << 40)] {
            assert_eq!(computed_pairs(&geo(d2, dt)), computed_pairs(&reach));
        }
    }
}
