//! PISA's routing selection on CPU: each query block's `k` key blocks of highest score, in descending score with
//! ties to the lower block id, NaN above every number (the order of a stable descending `torch.sort`, which the
//! torch and triton backends run; this replaces it on the rust backend so that both select the same blocks in the
//! same order).

use std::cmp::Ordering;

use crate::alloc;
use crate::cpu::common::{active_isa, check_input, check_output};
use crate::cpu::parallel::Team;
use crate::cpu::view::{err, DType, View, ViewError};

/// Whether key block `a` (score `sa`) comes before block `b` (score `sb`): NaN first, then higher scores, then the
/// lower id (`-0.0` and `0.0` tie, as in a sort's comparisons).
fn before((a, sa): (usize, f32), (b, sb): (usize, f32)) -> Ordering {
    match (sa.is_nan(), sb.is_nan()) {
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (true, true) => a.cmp(&b),
        (false, false) => sb.partial_cmp(&sa).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
    }
}

/// The first `top.len()` key blocks of `row` (the scores of one query block) in the order of [`before`].
fn top_row(row: &[f32], top: &mut [usize], order: &mut Vec<(usize, f32)>) {
    order.clear();
    order.extend(row.iter().copied().enumerate());
    let k = top.len();
    // `before` is a total order (ids are distinct), so an unstable selection and sort give the stable order.
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, |x, y| before(*x, *y));
    }
    order[..k].sort_unstable_by(|x, y| before(*x, *y));
    top.iter_mut().zip(&order[..k]).for_each(|(t, (j, _))| *t = *j);
}

/// Writes `blocks (B, H, M, k)` int64 (contiguous): each row's `k` blocks of highest `score (B, H, M, Mk)` (f32,
/// any strides), as [`before`] orders them. `1 <= k <= Mk`.
pub fn top_blocks(score: &View, blocks: &View, threads: usize) -> Result<(), ViewError> {
    active_isa()?;
    score.expect(4, true)?;
    blocks.expect(4, false)?;
    let [batch, heads, m, mk] = score.shape()[..] else { unreachable!("4 dims checked") };
    let k = blocks.shape()[3];
    check_input(score, &[batch, heads, m, mk], DType::F32)?;
    check_output(blocks, &[batch, heads, m, k], DType::I64)?;
    if k == 0 || k > mk {
        return err(format!("blocks: k = {k} must lie in 1..={mk}"));
    }
    let rows = alloc::size(&[batch, heads, m])?;
    let scratch = || -> Result<_, ViewError> { Ok((alloc::zeros::<f32>(mk)?, alloc::with_capacity(mk)?, alloc::zeros::<usize>(k)?)) };
    Team::new(threads).for_each_init(rows, scratch, |(row, order, top), r| {
        let idx = [r / (heads * m), r / m % heads, r % m];
        score.load_row(&idx, row);
        top_row(row, top, order);
        for (c, &j) in top.iter().enumerate() {
            // SAFETY: `blocks` is a validated contiguous int64 output of shape (B, H, M, k); row r belongs to this
            // task alone, and `c < k`.
            unsafe { blocks.store_i64(&[idx[0], idx[1], idx[2], c], j as i64) };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable descending sort's first k ids (NaN greatest), by a sort that is stable by construction.
    fn sorted(row: &[f32], k: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = (0..row.len()).collect();
        let key = |j: usize| if row[j].is_nan() { f64::INFINITY } else { row[j] as f64 };
        ids.sort_by(|&a, &b| {
            let (x, y) = (row[a], row[b]);
            match (x.is_nan(), y.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                _ => key(b).partial_cmp(&key(a)).unwrap(),
            }
        });
        ids.truncate(k);
        ids
    }

    #[test]
    fn ties_nan_infinities_and_signed_zeros_in_sort_order() {
        let row = [1.0, f32::NAN, 3.0, 3.0, -0.0, 0.0, f32::INFINITY, f32::NAN, f32::NEG_INFINITY, 3.0, 0.0, -1.0];
        for k in 1..=row.len() {
            let (mut top, mut order) = (vec![0; k], Vec::new());
            top_row(&row, &mut top, &mut order);
            assert_eq!(top, sorted(&row, k), "k = {k}");
        }
        let (mut top, mut order) = (vec![0; 7], Vec::new());
        top_row(&row, &mut top, &mut order);
        assert_eq!(top, [1, 7, 6, 2, 3, 9, 0]);
    }

    #[test]
    fn many_ties_and_every_k() {
        // Scores from a few levels: long runs of ties, where the order rests on the ids alone.
        let row: Vec<f32> = (0..97).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
        for k in [1, 2, 5, 11, 48, 96, 97] {
            let (mut top, mut order) = (vec![0; k], Vec::new());
            top_row(&row, &mut top, &mut order);
            assert_eq!(top, sorted(&row, k), "k = {k}");
        }
    }
}
