//! Static block plans (CLEAR, GRAT): token layouts in blocks and, per query block, the key blocks it attends.
//!
//! A plan is a CSR over query blocks: entries `indptr[i]..indptr[i+1]` of `indices` (key block ids) and
//! `kinds` (`FULL`: every pair allowed; `MASKED`: the kernel applies the mask per element). Key blocks not listed
//! are empty. Query and key sides have their own layout (order and block boundaries), so a kernel may use
//! different block sizes for queries and keys.

use std::fmt;

use super::grid::{GridError, TokenGrid};
use super::permute::{tile_order, Tile};
use crate::alloc::{self, AllocError};

/// Every pair of the two blocks is allowed: no per-element mask work.
pub const FULL: u8 = 0;
/// Some pairs are allowed: the kernel evaluates the mask per element.
pub const MASKED: u8 = 1;

/// What a block holds, for the pattern rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// A run of text tokens.
    Text,
    /// A run of image tokens inside tile (or group) `(ta, tp, tq)` spanning frames `t0..t1`, rows `y0..y1` and
    /// columns `x0..x1` (half-open).
    Image { tile: [usize; 3], t: [usize; 2], y: [usize; 2], x: [usize; 2] },
    /// Extra keys that every image query attends (CLEAR's global tokens).
    Global,
}

/// Tokens of one side in attention order: `perm` (gather indices into the sequence, extra tokens appended
/// after `N`) and block boundaries `offsets` (`M + 1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub perm: Vec<i64>,
    pub offsets: Vec<i64>,
    pub blocks: Vec<BlockKind>,
}

/// A plan's arrays that do not describe a plan (or a plan's grid that cannot be laid out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError(pub String);

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

impl From<AllocError> for PlanError {
    fn from(err: AllocError) -> Self {
        PlanError(err.0)
    }
}

impl From<GridError> for PlanError {
    fn from(err: GridError) -> Self {
        PlanError(err.to_string())
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError(msg.into()))
}

/// The element mask of `MASKED` entries (key validity, when a call has it, applies besides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spatial {
    /// Every pair allowed: GRAT (its masked entries are text keys under a padding mask).
    None,
    /// Image pairs allowed when `|dt| <= max_dt` and `dy² + dx² <= max_d2`; text and extra tokens always: CLEAR.
    Disc { max_d2: i64, max_dt: i64 },
}

/// Grid coordinates of a disc plan stay below this, so `dy² + dx²` fits in an i32.
pub const MAX_COORD: i32 = 32_768;

/// Key positions' `(t, y, x)` as three arrays (`t < 0`: text or extra key); the element mask's loop vectorises
/// over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyColumns {
    pub t: Vec<i32>,
    pub y: Vec<i32>,
    pub x: Vec<i32>,
}

/// The one block plan: built and validated once, then read by the CPU kernels as is and exported once per device
/// for the Triton kernels. Query and key sides each have a token order (`*_perm`, gather indices into the
/// sequence; keys may add extra tokens after it) and block boundaries (`*_offsets`); query block `i` attends key
/// blocks `indices[indptr[i]..indptr[i+1]]` with `kinds` (`FULL` or `MASKED`); the transpose lists, per key block,
/// the query blocks that attend it (the key-side backward); `q_coords` / `key_columns` hold `(t, y, x)` per
/// position (text `-1`, extra tokens `-2`) for the disc mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    q_perm: Vec<usize>,
    q_offsets: Vec<usize>,
    k_perm: Vec<usize>,
    k_offsets: Vec<usize>,
    indptr: Vec<usize>,
    indices: Vec<usize>,
    kinds: Vec<u8>,
    t_indptr: Vec<usize>,
    t_indices: Vec<usize>,
    t_kinds: Vec<u8>,
    q_coords: Vec<i32>,
    key_columns: KeyColumns,
    spatial: Spatial,
}

impl Layout {
    /// Tokens in tile order; text in runs of `text_block`; each tile cut into runs of at most `block` tokens
    /// (a tile smaller than `block` is one block). `extra` tokens (indices `N..N+extra`) are appended in runs
    /// of `block` as `Global` blocks.
    pub fn tiled(grid: &TokenGrid, tile: Tile, block: usize, text_block: usize, extra: usize) -> Result<Self, GridError> {
        if block == 0 || text_block == 0 {
            return Err(GridError::NonPositive { name: "block size" });
        }
        // Checked before anything is allocated: `coords` writes every side as int32.
        for (name, value) in [("frames", grid.frames), ("height", grid.height), ("width", grid.width)] {
            if i32::try_from(value).is_err() {
                return Err(GridError::SideTooLarge { name, value });
            }
        }
        let mut perm = tile_order(grid, tile)?;
        let mut layout = Layout { perm: Vec::new(), offsets: alloc::filled(1, 0)?, blocks: Vec::new() };
        let text_runs = |layout: &mut Layout| -> Result<(), AllocError> {
            for start in (0..grid.text_tokens).step_by(text_block) {
                layout.push((grid.text_tokens - start).min(text_block), BlockKind::Text)?;
            }
            Ok(())
        };
        if grid.text_position == super::grid::TextPosition::First {
            text_runs(&mut layout)?;
        }
        for t0 in (0..grid.frames).step_by(tile.frames) {
            for y0 in (0..grid.height).step_by(tile.height) {
                for x0 in (0..grid.width).step_by(tile.width) {
                    let t = [t0, t0.saturating_add(tile.frames).min(grid.frames)];
                    let y = [y0, y0.saturating_add(tile.height).min(grid.height)];
                    let x = [x0, x0.saturating_add(tile.width).min(grid.width)];
                    let tile_id = [t0 / tile.frames, y0 / tile.height, x0 / tile.width];
                    let size = (t[1] - t[0]) * (y[1] - y[0]) * (x[1] - x[0]);
                    for start in (0..size).step_by(block) {
                        layout.push((size - start).min(block), BlockKind::Image { tile: tile_id, t, y, x })?;
                    }
                }
            }
        }
        if grid.text_position == super::grid::TextPosition::Last {
            text_runs(&mut layout)?;
        }
        let n = grid.num_tokens() as i64;
        alloc::extend(&mut perm, n..n + extra as i64)?;
        for start in (0..extra).step_by(block) {
            layout.push((extra - start).min(block), BlockKind::Global)?;
        }
        layout.perm = perm;
        Ok(layout)
    }

    fn push(&mut self, len: usize, kind: BlockKind) -> Result<(), AllocError> {
        let end = self.offsets.last().copied().unwrap_or(0) + len as i64;
        alloc::push(&mut self.offsets, end)?;
        alloc::push(&mut self.blocks, kind)
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// `(t, y, x)` per position of this layout (`3 * perm.len()` values): text `(-1, -1, -1)`, extra tokens
    /// `(-2, -2, -2)`.
    pub fn coords(&self, grid: &TokenGrid) -> Result<Vec<i32>, AllocError> {
        let (n, start, frame) = (grid.num_tokens() as i64, grid.image_start() as i64, (grid.height * grid.width) as i64);
        let mut out = alloc::with_capacity(alloc::size(&[3, self.perm.len()])?)?;
        for &p in &self.perm {
            let image = p - start;
            if p >= n {
                out.extend([-2, -2, -2]);
            } else if image < 0 || image >= grid.image_tokens() as i64 {
                out.extend([-1, -1, -1]);
            } else {
                let (t, rest) = (image / frame, image % frame);
                out.extend([t as i32, (rest / grid.width as i64) as i32, (rest % grid.width as i64) as i32]);
            }
        }
        Ok(out)
    }
}

/// Largest integer strictly below `bound` (as used by the `<` tests of the masks): -1 when `bound <= 0` (or NaN),
/// `i64::MAX - 1` from `2^63` on (the float-to-int conversion saturates; nothing overflows).
pub fn max_below(bound: f64) -> i64 {
    if bound.is_nan() || bound <= 0.0 {
        return -1;
    }
    (bound.ceil() as i64) - 1
}

/// CLEAR's integer thresholds `(max_d2, max_dt)` on `grid`: `dy² + dx² <= max_d2` ⇔ `dy² + dx² < r²` and
/// `|dt| <= max_dt` ⇔ `|dt| < rt` on integer offsets. Both radii must be finite and > 0. Each threshold is at
/// least 0 (a query always sees itself, even where `r²` underflows) and at most the grid's reach,
/// `(height−1)² + (width−1)²` and `frames − 1`: a larger radius allows exactly the same pairs (the disc covers
/// the whole grid), and every later square or sum of the thresholds stays far from overflow.
pub fn disc_thresholds(grid: &TokenGrid, radius: f64, temporal_radius: f64) -> Result<(i64, i64), PlanError> {
    if !(radius.is_finite() && radius > 0.0 && temporal_radius.is_finite() && temporal_radius > 0.0) {
        let got = format!("got {radius} and {temporal_radius}");
        return invalid(format!("radius and temporal_radius must be finite and > 0, {got}"));
    }
    let side = |n: usize| i64::try_from(n - 1).unwrap_or(i64::MAX);
    let reach_d2 = square_sum(side(grid.height), side(grid.width));
    Ok((max_below(radius * radius).clamp(0, reach_d2), max_below(temporal_radius).clamp(0, side(grid.frames))))
}

/// `a² + b²`, saturating at `i64::MAX` (offsets of a grid whose sides exceed 3·10⁹ tokens).
fn square_sum(a: i64, b: i64) -> i64 {
    a.saturating_mul(a).saturating_add(b.saturating_mul(b))
}

fn gap(a: [usize; 2], b: [usize; 2]) -> (i64, i64) {
    // Smallest and largest |i - j| for i in a, j in b (half-open ranges).
    let (a0, a1, b0, b1) = (a[0] as i64, a[1] as i64 - 1, b[0] as i64, b[1] as i64 - 1);
    let min = (b0 - a1).max(a0 - b1).max(0);
    let max = (a1 - b0).abs().max((b1 - a0).abs());
    (min, max)
}

/// CLEAR's relation between two image blocks: `None` (no pair allowed), `FULL` or `MASKED`.
pub fn clear_relation(q: &BlockKind, k: &BlockKind, max_d2: i64, max_dt: i64) -> Option<u8> {
    match (q, k) {
        (BlockKind::Text, BlockKind::Global) => None,
        (BlockKind::Text, _) | (_, BlockKind::Text) | (_, BlockKind::Global) => Some(FULL),
        (BlockKind::Global, _) => None,
        (BlockKind::Image { t: qt, y: qy, x: qx, .. }, BlockKind::Image { t: kt, y: ky, x: kx, .. }) => {
            let (dt_min, dt_max) = gap(*qt, *kt);
            let (dy_min, dy_max) = gap(*qy, *ky);
            let (dx_min, dx_max) = gap(*qx, *kx);
            if dt_min > max_dt || square_sum(dy_min, dx_min) > max_d2 {
                None
            } else if dt_max <= max_dt && square_sum(dy_max, dx_max) <= max_d2 {
                Some(FULL)
            } else {
                Some(MASKED)
            }
        }
    }
}

/// The CSR of a relation between query blocks and key blocks: `(indptr, indices, kinds)`.
fn relate(q: &Layout, k: &Layout, relation: impl Fn(&BlockKind, &BlockKind) -> Option<u8>) -> Result<Csr, AllocError> {
    let mut indptr = alloc::with_capacity(q.blocks.len() + 1)?;
    indptr.push(0i64);
    let (mut indices, mut kinds) = (Vec::new(), Vec::new());
    for qb in &q.blocks {
        for (j, kb) in k.blocks.iter().enumerate() {
            if let Some(kind) = relation(qb, kb) {
                alloc::push(&mut indices, j as i64)?;
                alloc::push(&mut kinds, i32::from(kind))?;
            }
        }
        indptr.push(indices.len() as i64);
    }
    Ok((indptr, indices, kinds))
}

/// A CSR as arrays: `(indptr, indices, kinds)`.
pub type Csr = (Vec<i64>, Vec<i64>, Vec<i32>);

/// Options of a CLEAR plan.
#[derive(Clone, Copy, Debug)]
pub struct ClearOptions {
    pub radius: f64,
    pub temporal_radius: f64,
    pub global_tokens: usize,
    pub q_tile: Tile,
    pub k_tile: Tile,
    pub q_block: usize,
    pub k_block: usize,
}

/// CLEAR: image queries see a disc (and all text, and the global tokens); text queries see every token but the
/// global ones. The plan's mask is the disc of [`disc_thresholds`].
pub fn clear_plan(grid: &TokenGrid, o: &ClearOptions) -> Result<BlockPlan, PlanError> {
    let (max_d2, max_dt) = disc_thresholds(grid, o.radius, o.temporal_radius)?;
    let q = Layout::tiled(grid, o.q_tile, o.q_block, o.q_block, 0)?;
    let k = Layout::tiled(grid, o.k_tile, o.k_block, o.k_block, o.global_tokens)?;
    let csr = relate(&q, &k, |a, b| clear_relation(a, b, max_d2, max_dt))?;
    BlockPlan::from_layouts(grid, q, k, csr, Spatial::Disc { max_d2, max_dt })
}

/// GRAT's key-group pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GratPattern {
    /// Groups within `reach` on every axis.
    Neighbors { reach: usize },
    /// The group's row and column bands; on videos (`three_d`) also its frame plane.
    CrissCross { three_d: bool },
}

/// GRAT's relation between two blocks (groups are the tiles); `text_masked` marks text key blocks `MASKED` so
/// the kernel applies the text validity mask.
pub fn grat_relation(q: &BlockKind, k: &BlockKind, pattern: GratPattern, text_masked: bool) -> Option<u8> {
    match (q, k) {
        (_, BlockKind::Text) => Some(if text_masked { MASKED } else { FULL }),
        (BlockKind::Text, _) => Some(FULL),
        (_, BlockKind::Global) | (BlockKind::Global, _) => None,
        (BlockKind::Image { tile: a, .. }, BlockKind::Image { tile: b, .. }) => {
            let [da, dp, dq] = [0, 1, 2].map(|i| a[i].abs_diff(b[i]));
            let allowed = match pattern {
                GratPattern::Neighbors { reach } => da <= reach && dp <= reach && dq <= reach,
                GratPattern::CrissCross { three_d: false } => da == 0 && (dp == 0 || dq == 0),
                GratPattern::CrissCross { three_d: true } => da == 0 || dp == 0 || dq == 0,
            };
            allowed.then_some(FULL)
        }
    }
}

/// Options of a GRAT plan.
#[derive(Clone, Copy, Debug)]
pub struct GratOptions {
    pub group: Tile,
    pub pattern: GratPattern,
    pub text_masked: bool,
    pub q_block: usize,
    pub k_block: usize,
}

/// GRAT: group-major layouts (each group cut into blocks), group-level pattern, text rules.
pub fn grat_plan(grid: &TokenGrid, o: &GratOptions) -> Result<BlockPlan, PlanError> {
    let q = Layout::tiled(grid, o.group, o.q_block, o.q_block, 0)?;
    let k = Layout::tiled(grid, o.group, o.k_block, o.k_block, 0)?;
    let csr = relate(&q, &k, |a, b| grat_relation(a, b, o.pattern, o.text_masked))?;
    BlockPlan::from_layouts(grid, q, k, csr, Spatial::None)
}

/// The CSR transposed: for each key block, the query blocks that list it (and the entry kinds), in increasing
/// query-block order. Counts, prefix sum, fill — no dense mask.
#[allow(clippy::type_complexity)]
fn transpose(indptr: &[usize], indices: &[usize], kinds: &[u8], num_key_blocks: usize) -> Result<(Vec<usize>, Vec<usize>, Vec<u8>), AllocError> {
    let mut t_indptr = alloc::zeros::<usize>(num_key_blocks + 1)?;
    for &j in indices {
        t_indptr[j + 1] += 1;
    }
    for j in 0..num_key_blocks {
        t_indptr[j + 1] += t_indptr[j];
    }
    let mut fill = alloc::copy(&t_indptr)?;
    let (mut t_indices, mut t_kinds) = (alloc::zeros::<usize>(indices.len())?, alloc::zeros::<u8>(indices.len())?);
    for i in 0..indptr.len().saturating_sub(1) {
        for e in indptr[i]..indptr[i + 1] {
            let slot = &mut fill[indices[e]];
            t_indices[*slot] = i;
            t_kinds[*slot] = kinds[e];
            *slot += 1;
        }
    }
    Ok((t_indptr, t_indices, t_kinds))
}

fn to_usize(name: &str, values: Vec<i64>, bound: usize) -> Result<Vec<usize>, PlanError> {
    if let Some(x) = values.iter().find(|&&x| usize::try_from(x).map_or(true, |u| u > bound)) {
        return invalid(format!("{name}: value {x} out of range 0..={bound}"));
    }
    Ok(alloc::collect(values.into_iter().map(|x| x as usize))?)
}

fn check_permutation(name: &str, perm: &[usize], n: usize) -> Result<(), PlanError> {
    let mut seen = alloc::filled(n, false)?;
    for &p in perm {
        if p >= n || std::mem::replace(&mut seen[p], true) {
            return invalid(format!("{name}: not a permutation of 0..{n}"));
        }
    }
    Ok(())
}

fn check_offsets(name: &str, offsets: &[usize], n: usize) -> Result<(), PlanError> {
    if offsets.first() != Some(&0) || offsets.last() != Some(&n) || offsets.windows(2).any(|w| w[0] > w[1]) {
        return invalid(format!("{name}: must rise from 0 to {n}"));
    }
    Ok(())
}

fn check_csr(indptr: &[usize], indices: &[usize], kinds: &[u8], rows: usize, cols: usize) -> Result<(), PlanError> {
    if indptr.len() != rows + 1 || indptr[0] != 0 || indptr.windows(2).any(|w| w[0] > w[1]) || indptr[rows] != indices.len() {
        return invalid(format!("plan: indptr does not describe {rows} rows of {} entries", indices.len()));
    }
    if kinds.len() != indices.len() || kinds.iter().any(|&k| k > MASKED) || indices.iter().any(|&j| j >= cols) {
        return invalid("plan: indices or kinds out of range");
    }
    Ok(())
}

impl BlockPlan {
    /// Validates every array (permutations, offsets rising from 0 to the token counts, the CSR, coordinates per
    /// position) and builds the transpose; any violation is an error, never a plan.
    #[allow(clippy::too_many_arguments)]
    pub fn from_arrays(
        q_perm: Vec<i64>,
        q_offsets: Vec<i64>,
        k_perm: Vec<i64>,
        k_offsets: Vec<i64>,
        csr: Csr,
        q_coords: Vec<i32>,
        k_coords: Vec<i32>,
        spatial: Spatial,
    ) -> Result<Self, PlanError> {
        let (nq, nk) = (q_perm.len(), k_perm.len());
        let q_perm = to_usize("q_perm", q_perm, nq)?;
        let k_perm = to_usize("k_perm", k_perm, nk)?;
        check_permutation("q_perm", &q_perm, nq)?;
        check_permutation("k_perm", &k_perm, nk)?;
        let q_offsets = to_usize("q_offsets", q_offsets, nq)?;
        let k_offsets = to_usize("k_offsets", k_offsets, nk)?;
        check_offsets("q_offsets", &q_offsets, nq)?;
        check_offsets("k_offsets", &k_offsets, nk)?;
        let (mq, mk) = (q_offsets.len() - 1, k_offsets.len() - 1);
        let (indptr, indices, kinds) = csr;
        let indptr = to_usize("indptr", indptr, usize::MAX >> 1)?;
        let indices = to_usize("indices", indices, usize::MAX >> 1)?;
        if kinds.iter().any(|&k| !(0..=i32::from(MASKED)).contains(&k)) {
            return invalid("kinds: values must be 0 (full) or 1 (masked)");
        }
        let kinds: Vec<u8> = alloc::collect(kinds.into_iter().map(|k| k as u8))?;
        check_csr(&indptr, &indices, &kinds, mq, mk)?;
        if q_coords.len() != 3 * nq || k_coords.len() != 3 * nk {
            return invalid("coords: need 3 values per token");
        }
        // Only the disc squares coordinate differences (in i32).
        if matches!(spatial, Spatial::Disc { .. }) && q_coords.iter().chain(&k_coords).any(|&c| !(-2..MAX_COORD).contains(&c)) {
            return invalid(format!("coords: values must lie in -2..{MAX_COORD}"));
        }
        let (t_indptr, t_indices, t_kinds) = transpose(&indptr, &indices, &kinds, mk)?;
        let column = |i: usize| alloc::collect(k_coords.chunks_exact(3).map(|c| c[i]));
        let key_columns = KeyColumns { t: column(0)?, y: column(1)?, x: column(2)? };
        Ok(BlockPlan {
            q_perm, q_offsets, k_perm, k_offsets, indptr, indices, kinds, t_indptr, t_indices, t_kinds, q_coords,
            key_columns, spatial,
        })
    }

    fn from_layouts(grid: &TokenGrid, q: Layout, k: Layout, csr: Csr, spatial: Spatial) -> Result<Self, PlanError> {
        let (q_coords, k_coords) = (q.coords(grid)?, k.coords(grid)?);
        Self::from_arrays(q.perm, q.offsets, k.perm, k.offsets, csr, q_coords, k_coords, spatial)
    }

    /// Query tokens in attention order (gather indices into the sequence).
    pub fn q_perm(&self) -> &[usize] {
        &self.q_perm
    }

    /// Query block boundaries (blocks + 1).
    pub fn q_offsets(&self) -> &[usize] {
        &self.q_offsets
    }

    /// Key tokens in attention order (indices past the sequence are extra keys).
    pub fn k_perm(&self) -> &[usize] {
        &self.k_perm
    }

    /// Key block boundaries (blocks + 1).
    pub fn k_offsets(&self) -> &[usize] {
        &self.k_offsets
    }

    pub fn indptr(&self) -> &[usize] {
        &self.indptr
    }

    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    pub fn kinds(&self) -> &[u8] {
        &self.kinds
    }

    pub fn t_indptr(&self) -> &[usize] {
        &self.t_indptr
    }

    pub fn t_indices(&self) -> &[usize] {
        &self.t_indices
    }

    pub fn t_kinds(&self) -> &[u8] {
        &self.t_kinds
    }

    /// `(t, y, x)` per query position, 3 values each.
    pub fn q_coords(&self) -> &[i32] {
        &self.q_coords
    }

    pub fn key_columns(&self) -> &KeyColumns {
        &self.key_columns
    }

    /// `(t, y, x)` per key position, 3 values each (the columns interleaved).
    pub fn k_coords(&self) -> Result<Vec<i32>, AllocError> {
        let c = &self.key_columns;
        alloc::collect((0..c.t.len()).flat_map(|i| [c.t[i], c.y[i], c.x[i]]))
    }

    pub fn spatial(&self) -> Spatial {
        self.spatial
    }

    pub fn num_query_blocks(&self) -> usize {
        self.q_offsets.len() - 1
    }

    pub fn num_key_blocks(&self) -> usize {
        self.k_offsets.len() - 1
    }

    /// The query positions of query block `i`: `(first, len)`.
    pub fn q_block(&self, i: usize) -> (usize, usize) {
        (self.q_offsets[i], self.q_offsets[i + 1] - self.q_offsets[i])
    }

    /// The key positions of key block `j`: `(first, len)`.
    pub fn k_block(&self, j: usize) -> (usize, usize) {
        (self.k_offsets[j], self.k_offsets[j + 1] - self.k_offsets[j])
    }

    pub fn max_q_block(&self) -> usize {
        self.q_offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    pub fn max_k_block(&self) -> usize {
        self.k_offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// (query, key) pairs the engine computes over this plan: every pair of every listed block pair.
    pub fn computed_pairs(&self) -> u64 {
        (0..self.num_query_blocks())
            .flat_map(|i| (self.indptr[i]..self.indptr[i + 1]).map(move |e| (i, e)))
            .map(|(i, e)| (self.q_block(i).1 * self.k_block(self.indices[e]).1) as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::grid::TextPosition;

    /// Brute-force CLEAR mask over sequence indices, straight from its definition.
    fn clear_allowed(grid: &TokenGrid, a: usize, b: usize, r: f64, rt: f64) -> bool {
        let coord = |i: usize| -> Option<(i64, i64, i64)> {
            let s = grid.image_start();
            (i >= s && i < s + grid.image_tokens()).then(|| {
                let j = i - s;
                let f = grid.height * grid.width;
                ((j / f) as i64, ((j % f) / grid.width) as i64, (j % grid.width) as i64)
            })
        };
        match (coord(a), coord(b)) {
            (Some((t0, y0, x0)), Some((t1, y1, x1))) => {
                (((y0 - y1).pow(2) + (x0 - x1).pow(2)) as f64) < r * r && ((t0 - t1).abs() as f64) < rt
            }
            _ => true,
        }
    }

    fn expand(plan: &BlockPlan, allowed: impl Fn(usize, usize) -> bool) -> (usize, bool) {
        // Returns (allowed pairs covered by the plan, every FULL entry truly full).
        let (mut covered, mut full_ok) = (0usize, true);
        for i in 0..plan.num_query_blocks() {
            let (q0, lq) = plan.q_block(i);
            for e in plan.indptr()[i]..plan.indptr()[i + 1] {
                let (k0, lk) = plan.k_block(plan.indices()[e]);
                for &qa in &plan.q_perm()[q0..q0 + lq] {
                    for &kb in &plan.k_perm()[k0..k0 + lk] {
                        let ok = allowed(qa, kb);
                        covered += ok as usize;
                        full_ok &= plan.kinds()[e] == MASKED || ok;
                    }
                }
            }
        }
        (covered, full_ok)
    }

    #[test]
    fn clear_plan_covers_exactly_the_mask() {
        for (frames, h, w, text, pos, r, rt) in [
            (1, 13, 11, 5, TextPosition::First, 3.0, 1.0),
            (2, 9, 14, 3, TextPosition::Last, 4.5, 2.0),
            (3, 7, 7, 0, TextPosition::First, 2.0, 1.5),
        ] {
            let grid = TokenGrid::new(frames, h, w, text, pos).unwrap();
            let o = ClearOptions {
                radius: r,
                temporal_radius: rt,
                global_tokens: 0,
                q_tile: Tile::new(1, 4, 4).unwrap(),
                k_tile: Tile::new(1, 2, 4).unwrap(),
                q_block: 16,
                k_block: 8,
            };
            let plan = clear_plan(&grid, &o).unwrap();
            let n = grid.num_tokens();
            let total = (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).filter(|&(a, b)| clear_allowed(&grid, a, b, r, rt)).count();
            let (covered, full_ok) = expand(&plan, |a, b| clear_allowed(&grid, a, b, r, rt));
            assert_eq!(covered, total);
            assert!(full_ok);
        }
    }

    /// GRAT's plan against its definition for groups from one token to `usize::MAX` (a group larger than the
    /// grid is one tile) and reach from 0 to `usize::MAX`, on grids with ragged tiles: nothing overflows, and
    /// every allowed pair is covered exactly once.
    #[test]
    fn grat_plan_takes_extreme_groups_and_reach() {
        let sides = [(1, 1, 1), (1, 5, 7), (3, 4, 2)];
        let groups = [(1, 1, 1), (1, 2, 3), (2, 3, 2), (1, usize::MAX, 1), (usize::MAX, usize::MAX, usize::MAX)];
        let reaches = [0, 1, 2, usize::MAX];
        for &(frames, h, w) in &sides {
            let grid = TokenGrid::new(frames, h, w, 2, TextPosition::Last).unwrap();
            for &(gt, gy, gx) in &groups {
                let group = Tile::new(gt, gy, gx).unwrap();
                let tile_of = |i: usize| {
                    let j = i.checked_sub(grid.image_start()).filter(|&j| j < grid.image_tokens())?;
                    let f = h * w;
                    Some([(j / f) / gt, ((j % f) / w) / gy, (j % w) / gx])
                };
                for &reach in &reaches {
                    let o = GratOptions { group, pattern: GratPattern::Neighbors { reach }, text_masked: false, q_block: 4, k_block: 3 };
                    let plan = grat_plan(&grid, &o).unwrap();
                    let allowed = |a: usize, b: usize| match (tile_of(a), tile_of(b)) {
                        (Some(ta), Some(tb)) => (0..3).all(|i| ta[i].abs_diff(tb[i]) <= reach),
                        _ => true,
                    };
                    let n = grid.num_tokens();
                    let total = (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).filter(|&(a, b)| allowed(a, b)).count();
                    assert_eq!(expand(&plan, allowed), (total, true), "{frames}x{h}x{w}, group {gt}x{gy}x{gx}, reach {reach}");
                }
            }
        }
    }

    /// Plans hold `(t, y, x)` as int32: a side beyond `i32::MAX` is refused before the token order is allocated
    /// (a 1 x 2^31 x 1 grid would otherwise allocate 16 GiB, then write truncated coordinates).
    #[test]
    fn plans_refuse_sides_beyond_int32() {
        let big = i32::MAX as usize + 1;
        for (frames, h, w) in [(big, 1, 1), (1, big, 1), (1, 1, big)] {
            let grid = TokenGrid::new(frames, h, w, 0, TextPosition::First).unwrap();
            let e = Layout::tiled(&grid, Tile::new(1, 1, 1).unwrap(), 4, 4, 0).unwrap_err();
            assert!(matches!(e, GridError::SideTooLarge { value, .. } if value == big), "{e}");
        }
    }

    #[test]
    fn transpose_inverts_the_csr() {
        let grid = TokenGrid::new(1, 10, 10, 4, TextPosition::First).unwrap();
        let o = GratOptions {
            group: Tile::new(1, 4, 4).unwrap(),
            pattern: GratPattern::CrissCross { three_d: false },
            text_masked: true,
            q_block: 8,
            k_block: 4,
        };
        let plan = grat_plan(&grid, &o).unwrap();
        let (tp, ti, tk) = (plan.t_indptr(), plan.t_indices(), plan.t_kinds());
        let mut pairs: Vec<(usize, usize, u8)> = Vec::new();
        for j in 0..plan.num_key_blocks() {
            for e in tp[j]..tp[j + 1] {
                pairs.push((ti[e], j, tk[e]));
            }
        }
        pairs.sort();
        let mut direct: Vec<(usize, usize, u8)> = Vec::new();
        for i in 0..plan.num_query_blocks() {
            for e in plan.indptr()[i]..plan.indptr()[i + 1] {
                direct.push((i, plan.indices()[e], plan.kinds()[e]));
            }
        }
        assert_eq!(pairs, direct);
    }

    #[test]
    fn max_below_is_strict() {
        assert_eq!(max_below(64.0), 63);
        assert_eq!(max_below(64.5), 64);
        assert_eq!(max_below(1.0), 0);
        assert_eq!(max_below(0.25), 0);
        assert_eq!(max_below(0.0), -1);
        assert_eq!(max_below(f64::NAN), -1);
        assert_eq!(max_below(f64::INFINITY), i64::MAX - 1);
    }

    /// Radii from underflow to `f64::MAX` (the 3.05e9 hung CLEAR's CPU kernels) on grids up to sides whose
    /// squares overflow i64: thresholds stay in `[0, reach]`, a radius beyond the reach gives the whole-grid plan.
    #[test]
    fn disc_thresholds_clamp_every_radius_to_the_grid() {
        let radii = [f64::MIN_POSITIVE, 1e-300, 1e-3, 0.5, 1.0, 2f64.sqrt(), 2.5, 3.03e9, 3.05e9, 4e9, 1e10, 1e300, f64::MAX];
        let sides = [(1, 1, 1), (1, 7, 5), (3, 40_000, 1), (2, 1, 1 << 20), (1, 3_037_000_500, 2), (1, 1 << 40, 1 << 20)];
        for &(frames, h, w) in &sides {
            let grid = TokenGrid::new(frames, h, w, 0, TextPosition::First).unwrap();
            let reach = square_sum((h - 1) as i64, (w - 1) as i64);
            for &r in &radii {
                for &rt in &radii {
                    let (d2, dt) = disc_thresholds(&grid, r, rt).unwrap();
                    assert!((0..=reach).contains(&d2) && (0..frames as i64).contains(&dt), "{frames}x{h}x{w}, r={r}, rt={rt}");
                    if r <= 1.0 {
                        assert_eq!(d2, 0, "a radius <= 1 keeps only dy = dx = 0");
                    }
                    if r * r > reach as f64 + 1.0 && reach < i64::MAX - 1 {
                        assert_eq!(d2, reach);
                    }
                }
            }
            for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, -f64::INFINITY] {
                assert!(disc_thresholds(&grid, bad, 1.0).is_err() && disc_thresholds(&grid, 1.0, bad).is_err());
            }
        }
        let grid = TokenGrid::new(2, 9, 14, 3, TextPosition::Last).unwrap();
        let plan = |radius: f64, temporal_radius: f64| {
            let o = ClearOptions {
                radius,
                temporal_radius,
                global_tokens: 2,
                q_tile: Tile::new(1, 4, 4).unwrap(),
                k_tile: Tile::new(1, 2, 4).unwrap(),
                q_block: 16,
                k_block: 8,
            };
            clear_plan(&grid, &o).unwrap()
        };
        let whole = plan(f64::MAX, f64::MAX);
        assert!(whole.kinds().iter().all(|&k| k == FULL));
        for r in [17.0, 3.05e9, 1e300] {
            assert_eq!(plan(r, 1e300), whole);
        }
    }
}
