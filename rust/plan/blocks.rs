//! Static block plans (CLEAR, GRAT): token layouts in blocks and, per query block, the key blocks it attends.
//!
//! A plan is a CSR over query blocks: entries `indptr[i]..indptr[i+1]` of `indices` (key block ids) and
//! `kinds` (`FULL`: every pair allowed; `MASKED`: the kernel applies the mask per element). Key blocks not listed
//! are empty. Query and key sides have their own layout (order and block boundaries), so a kernel may use
//! different block sizes for queries and keys.

use super::grid::{GridError, TokenGrid};
use super::permute::{tile_order, Tile};

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

/// The CSR plan: for query block `i`, key blocks `indices[indptr[i]..indptr[i+1]]` with `kinds`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    pub q: Layout,
    pub k: Layout,
    pub indptr: Vec<i64>,
    pub indices: Vec<i64>,
    pub kinds: Vec<u8>,
}

impl Layout {
    /// Tokens in tile order; text in runs of `text_block`; each tile cut into runs of at most `block` tokens
    /// (a tile smaller than `block` is one block). `extra` tokens (indices `N..N+extra`) are appended in runs
    /// of `block` as `Global` blocks.
    pub fn tiled(grid: &TokenGrid, tile: Tile, block: usize, text_block: usize, extra: usize) -> Result<Self, GridError> {
        if block == 0 || text_block == 0 {
            return Err(GridError::NonPositive { name: "block size" });
        }
        let mut perm = tile_order(grid, tile);
        let mut layout = Layout { perm: Vec::new(), offsets: vec![0], blocks: Vec::new() };
        let text_runs = |layout: &mut Layout| {
            for start in (0..grid.text_tokens).step_by(text_block) {
                layout.push((grid.text_tokens - start).min(text_block), BlockKind::Text);
            }
        };
        if grid.text_position == super::grid::TextPosition::First {
            text_runs(&mut layout);
        }
        for t0 in (0..grid.frames).step_by(tile.frames) {
            for y0 in (0..grid.height).step_by(tile.height) {
                for x0 in (0..grid.width).step_by(tile.width) {
                    let t = [t0, (t0 + tile.frames).min(grid.frames)];
                    let y = [y0, (y0 + tile.height).min(grid.height)];
                    let x = [x0, (x0 + tile.width).min(grid.width)];
                    let tile_id = [t0 / tile.frames, y0 / tile.height, x0 / tile.width];
                    let size = (t[1] - t[0]) * (y[1] - y[0]) * (x[1] - x[0]);
                    for start in (0..size).step_by(block) {
                        layout.push((size - start).min(block), BlockKind::Image { tile: tile_id, t, y, x });
                    }
                }
            }
        }
        if grid.text_position == super::grid::TextPosition::Last {
            text_runs(&mut layout);
        }
        let n = grid.num_tokens() as i64;
        perm.extend(n..n + extra as i64);
        for start in (0..extra).step_by(block) {
            layout.push((extra - start).min(block), BlockKind::Global);
        }
        layout.perm = perm;
        Ok(layout)
    }

    fn push(&mut self, len: usize, kind: BlockKind) {
        let end = self.offsets.last().copied().unwrap_or(0) + len as i64;
        self.offsets.push(end);
        self.blocks.push(kind);
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// `(t, y, x)` per position of this layout (`3 * perm.len()` values): text `(-1, -1, -1)`, extra tokens
    /// `(-2, -2, -2)`.
    pub fn coords(&self, grid: &TokenGrid) -> Vec<i32> {
        let (n, start, frame) = (grid.num_tokens() as i64, grid.image_start() as i64, (grid.height * grid.width) as i64);
        let mut out = Vec::with_capacity(3 * self.perm.len());
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
        out
    }
}

/// Largest integer strictly below `bound` (as used by the `<` tests of the masks), or -1 when `bound <= 0`.
pub fn max_below(bound: f64) -> i64 {
    if bound <= 0.0 {
        return -1;
    }
    (bound.ceil() as i64) - 1
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
            if dt_min > max_dt || dy_min * dy_min + dx_min * dx_min > max_d2 {
                None
            } else if dt_max <= max_dt && dy_max * dy_max + dx_max * dx_max <= max_d2 {
                Some(FULL)
            } else {
                Some(MASKED)
            }
        }
    }
}

/// Builds the CSR from a relation between a query block and a key block.
pub fn build_plan(q: Layout, k: Layout, relation: impl Fn(&BlockKind, &BlockKind) -> Option<u8>) -> BlockPlan {
    let mut indptr = vec![0i64];
    let (mut indices, mut kinds) = (Vec::new(), Vec::new());
    for qb in &q.blocks {
        for (j, kb) in k.blocks.iter().enumerate() {
            if let Some(kind) = relation(qb, kb) {
                indices.push(j as i64);
                kinds.push(kind);
            }
        }
        indptr.push(indices.len() as i64);
    }
    BlockPlan { q, k, indptr, indices, kinds }
}

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
/// global ones. Returns the plan and the integer thresholds `(max_d2, max_dt)` of the element mask.
pub fn clear_plan(grid: &TokenGrid, o: &ClearOptions) -> Result<(BlockPlan, i64, i64), GridError> {
    let q = Layout::tiled(grid, o.q_tile, o.q_block, o.q_block, 0)?;
    let k = Layout::tiled(grid, o.k_tile, o.k_block, o.k_block, o.global_tokens)?;
    let max_d2 = max_below(o.radius * o.radius);
    let max_dt = max_below(o.temporal_radius);
    let plan = build_plan(q, k, |a, b| clear_relation(a, b, max_d2, max_dt));
    Ok((plan, max_d2, max_dt))
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
pub fn grat_plan(grid: &TokenGrid, o: &GratOptions) -> Result<BlockPlan, GridError> {
    let q = Layout::tiled(grid, o.group, o.q_block, o.q_block, 0)?;
    let k = Layout::tiled(grid, o.group, o.k_block, o.k_block, 0)?;
    Ok(build_plan(q, k, |a, b| grat_relation(a, b, o.pattern, o.text_masked)))
}

/// The CSR transposed: for each key block, the query blocks that list it (and the entry kinds), in increasing
/// query-block order. Counts, prefix sum, fill — no dense mask.
pub fn transpose(indptr: &[i64], indices: &[i64], kinds: &[u8], num_key_blocks: usize) -> (Vec<i64>, Vec<i64>, Vec<u8>) {
    let mut counts = vec![0i64; num_key_blocks + 1];
    for &j in indices {
        counts[j as usize + 1] += 1;
    }
    for j in 0..num_key_blocks {
        counts[j + 1] += counts[j];
    }
    let t_indptr = counts.clone();
    let mut fill = counts;
    let mut t_indices = vec![0i64; indices.len()];
    let mut t_kinds = vec![0u8; indices.len()];
    for i in 0..indptr.len().saturating_sub(1) {
        for e in indptr[i] as usize..indptr[i + 1] as usize {
            let j = indices[e] as usize;
            let slot = fill[j] as usize;
            t_indices[slot] = i as i64;
            t_kinds[slot] = kinds[e];
            fill[j] += 1;
        }
    }
    (t_indptr, t_indices, t_kinds)
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
        for i in 0..plan.q.num_blocks() {
            for e in plan.indptr[i] as usize..plan.indptr[i + 1] as usize {
                let j = plan.indices[e] as usize;
                for qa in plan.q.offsets[i]..plan.q.offsets[i + 1] {
                    for kb in plan.k.offsets[j]..plan.k.offsets[j + 1] {
                        let ok = allowed(plan.q.perm[qa as usize] as usize, plan.k.perm[kb as usize] as usize);
                        covered += ok as usize;
                        full_ok &= plan.kinds[e] == MASKED || ok;
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
            let (plan, _, _) = clear_plan(&grid, &o).unwrap();
            let n = grid.num_tokens();
            let total = (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).filter(|&(a, b)| clear_allowed(&grid, a, b, r, rt)).count();
            let (covered, full_ok) = expand(&plan, |a, b| clear_allowed(&grid, a, b, r, rt));
            assert_eq!(covered, total);
            assert!(full_ok);
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
        let (tp, ti, tk) = transpose(&plan.indptr, &plan.indices, &plan.kinds, plan.k.num_blocks());
        let mut pairs: Vec<(i64, i64, u8)> = Vec::new();
        for j in 0..plan.k.num_blocks() {
            for e in tp[j] as usize..tp[j + 1] as usize {
                pairs.push((ti[e], j as i64, tk[e]));
            }
        }
        pairs.sort();
        let mut direct: Vec<(i64, i64, u8)> = Vec::new();
        for i in 0..plan.q.num_blocks() {
            for e in plan.indptr[i] as usize..plan.indptr[i + 1] as usize {
                direct.push((i as i64, plan.indices[e], plan.kinds[e]));
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
    }
}
