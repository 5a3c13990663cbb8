//! LLSA's hierarchical top-K selection on CPU, and the pass that prepares its inputs (the pooled pyramid in
//! Z-order, [`zorder_pool`]). The selection: dense top-K at the coarsest level, then
//! at each finer level top-K over the children of the parent's choices. Scores are raw dot products of the pooled q and k (f32);
//! ranks follow a descending stable sort: higher score first, ties to the lower id, NaN above everything (as
//! `torch.sort` orders them), −0.0 equal to +0.0.

use super::{err, Pooling, View, ViewError};
use crate::alloc;
use crate::cpu::common::{active_isa, gather, zeros};
use crate::cpu::matmul::{Gemm, Mat, MatMut};
use crate::cpu::parallel::Team;
use crate::cpu::view::DType;

/// One level of the pyramid: pooled queries and keys `(B, H, n, D)` (f32) and the output ids `(B, H, n, K)` (int64,
/// contiguous).
pub struct Level<'a> {
    pub queries: &'a View,
    pub keys: &'a View,
    pub out: &'a View,
}

/// The total order of ranks: the float order on the bits (−0.0 folded into +0.0; NaN above +∞).
#[inline]
fn rank_key(score: f32) -> i32 {
    let bits = (score + 0.0).to_bits() as i32;
    bits ^ ((bits >> 31) & 0x7FFF_FFFF)
}

/// The `count` best `(key, id)` pairs of a row, best first (higher key, then lower id), by insertion.
fn top(scores: &[f32], ids: impl Iterator<Item = usize>, count: usize, best: &mut Vec<(i32, usize)>) {
    best.clear();
    for (&s, id) in scores.iter().zip(ids) {
        let key = rank_key(s);
        if best.len() == count && key <= best[count - 1].0 {
            continue; // ids come in increasing order, so an equal key never displaces an earlier one
        }
        let at = best.partition_point(|&(k, _)| k >= key);
        if best.len() == count {
            best.pop();
        }
        best.insert(at, (key, id));
    }
}

struct Shape {
    batch_heads: usize,
    heads: usize,
    d: usize,
    sizes: Vec<usize>,
    topks: Vec<usize>,
}

fn check(levels: &[Level], block: usize) -> Result<Shape, ViewError> {
    let first = levels.first().ok_or_else(|| ViewError("selection needs at least one level".into()))?;
    let (batch, heads, d) = (
        first.queries.shape().first().copied().unwrap_or(0),
        first.queries.shape().get(1).copied().unwrap_or(0),
        first.queries.shape().get(3).copied().unwrap_or(0),
    );
    let (mut sizes, mut topks) = (Vec::new(), Vec::new());
    for (l, level) in levels.iter().enumerate() {
        for t in [level.queries, level.keys] {
            if t.dtype() != DType::F32 || t.shape().len() != 4 || t.shape()[..2] != [batch, heads] || t.shape()[3] != d {
                return err(format!(
                    "{}: level {} must be float32 (B, H, n, D) = ({batch}, {heads}, n, {d})",
                    t.name(),
                    l + 1
                ));
            }
        }
        let n = level.queries.shape()[2];
        let out = level.out;
        if level.keys.shape()[2] != n
            || out.dtype() != DType::I64
            || out.shape().len() != 4
            || out.shape()[..3] != [batch, heads, n]
        {
            return err(format!("level {}: keys and ids must cover the {n} queries (ids int64 (B, H, n, K))", l + 1));
        }
        out.expect_contiguous()?;
        if let Some(&finer) = sizes.last() {
            if n != usize::div_ceil(finer, block) {
                return err(format!("level {}: {n} tokens, expected ceil({finer} / {block})", l + 1));
            }
        }
        sizes.push(n);
        topks.push(out.shape()[3]);
    }
    let last = levels.len() - 1;
    if topks[last] == 0 || topks[last] > sizes[last] || topks.contains(&0) {
        return err(format!("top-K must lie in 1..={} at the coarsest level and be >= 1 everywhere", sizes[last]));
    }
    Ok(Shape { batch_heads: batch * heads, heads, d, sizes, topks })
}

/// Writes `I_l` into every level's `out`; `levels[0]` is level 1 (the fine blocks), the last the coarsest.
pub fn select(levels: &[Level], block: usize, threads: usize) -> Result<(), ViewError> {
    if block < 2 {
        return err("block size must be >= 2");
    }
    active_isa()?;
    let shape = check(levels, block)?;
    let team = Team::new(threads);
    let coarsest = levels.len() - 1;
    team.for_each(shape.batch_heads, |bh| coarse(&levels[coarsest], &shape, coarsest, bh))?;
    for l in (0..coarsest).rev() {
        let parents = shape.sizes[l + 1];
        team.for_each(shape.batch_heads * parents, |task| {
            refine(&levels[l], &levels[l + 1], &shape, l, block, task / parents, task % parents)
        })?;
    }
    Ok(())
}

/// Writes one row of ids (`out` validated contiguous int64; this task is its only writer).
fn write_ids(out: &View, b: usize, h: usize, row: usize, ids: &[(i32, usize)]) {
    for (i, &(_, id)) in ids.iter().enumerate() {
        // SAFETY: `check` validated `out` as a contiguous int64 output; row `row` of slice (b, h) is written by
        // this task only, and nothing reads it before the level is done.
        unsafe { out.store_i64(&[b, h, row, i], id as i64) };
    }
}

/// Query rows scored at once at the coarsest level (bounds the score buffer when that level is large).
const COARSE_ROWS: usize = 64;

fn coarse(level: &Level, shape: &Shape, l: usize, bh: usize) -> Result<(), ViewError> {
    let (b, h, d, n, count) = (bh / shape.heads, bh % shape.heads, shape.d, shape.sizes[l], shape.topks[l]);
    let chunk = COARSE_ROWS.min(n);
    let (mut q, mut k, mut s) = (zeros(chunk * d)?, zeros(n * d)?, zeros(alloc::size(&[chunk, n])?)?);
    gather(level.keys, (b, h), 0..n, 1.0, &mut k);
    let mut best = alloc::with_capacity(count + 1)?;
    for j0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - j0);
        gather(level.queries, (b, h), j0..j0 + rows, 1.0, &mut q);
        Gemm { m: rows, n, k: d, accumulate: false }.run(MatMut::rows(&mut s, n), Mat::rows(&q, d), Mat::rows(&k, d).t());
        for r in 0..rows {
            top(&s[r * n..(r + 1) * n], 0..n, count, &mut best);
            write_ids(level.out, b, h, j0 + r, &best);
        }
    }
    Ok(())
}

/// `I_l` for the children of level-(l+1) token `p` of `(b·h)`: top-K over the children of `I_{l+1}[p]`.
fn refine(
    level: &Level,
    parent: &Level,
    shape: &Shape,
    l: usize,
    block: usize,
    bh: usize,
    p: usize,
) -> Result<(), ViewError> {
    let (b, h, d, n, count) = (bh / shape.heads, bh % shape.heads, shape.d, shape.sizes[l], shape.topks[l]);
    let parent_count = shape.topks[l + 1];
    // The parent level's ids, written by this call (so in `0..parent size`) before this level started.
    let mut chosen: Vec<usize> = alloc::collect((0..parent_count).map(|i| parent.out.load_i64(&[b, h, p, i]) as usize))?;
    chosen.sort_unstable();
    let candidates: Vec<usize> = alloc::collect(chosen.iter().flat_map(|&c| c * block..((c + 1) * block).min(n)))?;
    if candidates.len() < count {
        return err(format!("level {}: top-K {count} exceeds the {} candidates of a query", l + 1, candidates.len()));
    }
    let kc = candidates.len();
    let (r0, rows) = (p * block, block.min(n - p * block));
    let (mut q, mut k, mut s) = (zeros(rows * d)?, zeros(kc * d)?, zeros(alloc::size(&[rows, kc])?)?);
    gather(level.queries, (b, h), r0..r0 + rows, 1.0, &mut q);
    gather(level.keys, (b, h), candidates.iter().copied(), 1.0, &mut k);
    Gemm { m: rows, n: kc, k: d, accumulate: false }.run(MatMut::rows(&mut s, kc), Mat::rows(&q, d), Mat::rows(&k, d).t());
    let mut best = alloc::with_capacity(count + 1)?;
    for r in 0..rows {
        top(&s[r * kc..(r + 1) * kc], candidates.iter().copied(), count, &mut best);
        write_ids(level.out, b, h, r0 + r, &best);
    }
    Ok(())
}

/// Fine rows read per task of [`zorder_pool`] at least (whole coarsest tokens: tasks own their pooled rows).
const POOL_ROWS: usize = 512;

/// The pyramid of `src[b, h, perm[r]]` (the rows in Z-order, read in place: `src (B, H, N, C)` any strides and float
/// dtype) in `pooled (B, H, P, C)` (f32, contiguous, levels `1..=levels` concatenated, `levels >= 1`), as
/// `llsa_plan.pyramid` computes them: pooling children, each token the mean of its level-(l−1) children; pooling
/// tokens, the mean of all fine tokens under it (level-l sums taken in order over the `block` level-(l−1) sums and
/// divided by the count). `perm` holds `N` int64 row ids in `[0, N)`.
pub fn zorder_pool(src: &View, perm: &View, pooled: &View, block: usize, levels: usize, pooling: Pooling, threads: usize) -> Result<(), ViewError> {
    active_isa()?;
    src.expect(4, true)?;
    let (bh_shape, n, c) = ([src.shape()[0], src.shape()[1]], src.shape()[2], src.shape()[3]);
    let ids = perm.to_i64_vec()?;
    let mut rows: Vec<usize> = alloc::with_capacity(ids.len())?;
    for x in ids {
        rows.push(usize::try_from(x).ok().filter(|&r| r < n).ok_or_else(|| ViewError(format!("{}: row ids must lie in [0, {n})", perm.name())))?);
    }
    if rows.len() != n {
        return err(format!("{}: expected {n} row ids, got {}", perm.name(), rows.len()));
    }
    if levels == 0 || block < 2 {
        return err("the pyramid needs levels >= 1 and a block size >= 2");
    }
    let span = (0..levels)
        .try_fold(1usize, |acc, _| acc.checked_mul(block))
        .ok_or_else(|| ViewError("block_size ** levels overflows".into()))?;
    // sizes[l] = tokens of level l; level_rows[l - 1] = first row of level l in `pooled`.
    let mut sizes = vec![n];
    for l in 0..levels {
        sizes.push(sizes[l].div_ceil(block));
    }
    let level_rows: Vec<usize> =
        sizes[1..].iter().scan(0, |acc, &s| Some(std::mem::replace(acc, *acc + s))).collect();
    let total: usize = sizes[1..].iter().sum();
    let want = [bh_shape[0], bh_shape[1], total, c];
    if pooled.shape() != want || pooled.dtype() != DType::F32 {
        return err(format!("{}: expected float32 {want:?}, got {:?} {:?}", pooled.name(), pooled.dtype(), pooled.shape()));
    }
    pooled.expect_contiguous()?;
    let chunk = span.saturating_mul(POOL_ROWS.div_ceil(span)).max(1);
    let per_bh = n.div_ceil(chunk);
    let heads = bh_shape[1];
    Team::new(threads).for_each_init(
        bh_shape[0] * heads * per_bh,
        || Ok((Vec::new(), zeros::<f32>(c)?)),
        |(sums, mean), task| {
            let (bh, t) = (task / per_bh, task % per_bh);
            let (b, h, r0) = (bh / heads, bh % heads, t * chunk);
            let r1 = (r0 + chunk).min(n);
            sums.clear();
            alloc::resize(sums, alloc::size(&[r1 - r0, c])?, 0.0f32)?;
            for r in r0..r1 {
                let row = &mut sums[(r - r0) * c..(r - r0 + 1) * c];
                src.load_row(&[b, h, rows[r]], row);
            }
            // Level by level, in place: token i of the level sums rows [i·block, (i+1)·block) of the level below (the
            // children's means when pooling children: the sum over their number, then, is the token's mean).
            let (mut len, mut first, mut count) = (r1 - r0, r0, 1usize);
            for l in 1..=levels {
                let next = len.div_ceil(block);
                for i in 0..next {
                    let (g0, g1) = (i * block, ((i + 1) * block).min(len));
                    for g in g0 + 1..g1 {
                        let (acc, rest) = sums.split_at_mut(g * c);
                        acc[g0 * c..(g0 + 1) * c].iter_mut().zip(&rest[..c]).for_each(|(a, x)| *a += x);
                    }
                    sums.copy_within(g0 * c..(g0 + 1) * c, i * c);
                    if pooling == Pooling::Children {
                        let inv = 1.0 / (g1 - g0) as f32;
                        sums[i * c..(i + 1) * c].iter_mut().for_each(|x| *x *= inv);
                    }
                }
                (len, first, count) = (next, first / block, count * block);
                for i in 0..len {
                    let fine = match pooling {
                        Pooling::Children => 1.0,
                        Pooling::Tokens => (n - (first + i) * count).min(count) as f32,
                    };
                    mean.iter_mut().zip(&sums[i * c..(i + 1) * c]).for_each(|(m, s)| *m = s / fine);
                    // SAFETY: `pooled` is a validated contiguous f32 output; level-l tokens [first, first + len) lie
                    // under this task's rows only, so it is the only one touching these rows.
                    unsafe { pooled.store_row(&[b, h, level_rows[l - 1] + first + i], mean) };
                }
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_like_a_stable_descending_sort() {
        let scores = [0.0f32, -0.0, 1.0, -0.0, 0.0, f32::NEG_INFINITY, -1.0, f32::NAN, 1.0];
        let mut best = Vec::new();
        top(&scores, 0..scores.len(), scores.len(), &mut best);
        let ids: Vec<usize> = best.iter().map(|&(_, id)| id).collect();
        assert_eq!(ids, [7, 2, 8, 0, 1, 3, 4, 6, 5]);
        top(&scores, 0..scores.len(), 3, &mut best);
        assert_eq!(best.iter().map(|&(_, id)| id).collect::<Vec<_>>(), [7, 2, 8]);
    }
}
