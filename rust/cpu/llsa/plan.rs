//! The validated selection of one LLSA call, its sibling groups and its CSR transpose.

use super::{err, View, ViewError};
use crate::alloc;
use crate::cpu::view::DType;

/// Pooled logits of one group are at most this many floats (keeps a group's working set in L2).
const GROUP_BUDGET: usize = 1 << 16;

/// Every index checked against the sizes it addresses; built before any kernel touches memory.
pub struct Plan {
    pub batch_heads: usize,
    /// Fine tokens N.
    pub n: usize,
    /// Tokens per block (the same at every level).
    pub block: usize,
    /// Fine blocks `ceil(N / block)` (= fine query blocks).
    pub n_blocks: usize,
    /// Fine key blocks per query block (K_1).
    pub k_fine: usize,
    /// Pooled key blocks per query block.
    pub k_pooled: usize,
    /// `(B·H, n_blocks, k_fine)` fine key-block ids.
    pub fine: Vec<u32>,
    /// `(B·H, n_blocks, k_pooled)` pooled key-block ids.
    pub pooled: Vec<u32>,
    /// Row boundaries of the pooled blocks in `kp`, from 0 to P.
    pub pb_offsets: Vec<usize>,
    /// `log2(count)` of each pooled token.
    pub pbias: Vec<f32>,
    /// Rows of the longest pooled block.
    pub max_pooled_block: usize,
    /// First pooled row of each level `1..=L`, then P (`L + 1` values).
    pub level_rows: Vec<usize>,
    /// The row of q, k, v, out and the gradients holding each internal position (`None`: the identity). With the
    /// Z-order permutation here, the kernels gather and scatter through it and no permuted copy is made.
    rows: Option<Vec<usize>>,
    /// How the pooled tokens were made from the fine ones (their mean-pool backward).
    pub pooling: Pooling,
}

/// A level-l token is the plain mean of its level-(l−1) children (`Children`, the default) or of the fine tokens
/// under it (`Tokens`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooling {
    #[default]
    Children,
    Tokens,
}

fn ids(view: &View, name: &str, shape: [usize; 4], bound: usize) -> Result<Vec<u32>, ViewError> {
    if view.shape() != shape || view.dtype() != DType::I32 {
        return err(format!(
            "{name}: expected an int32 tensor of shape {shape:?}, got {:?} {:?}",
            view.dtype(), view.shape()
        ));
    }
    let raw = view.to_i32_vec()?;
    if raw.iter().any(|&x| u32::try_from(x).map_or(true, |u| u as usize >= bound)) {
        return err(format!("{name}: block ids must lie in [0, {bound})"));
    }
    Ok(alloc::collect(raw.into_iter().map(|x| x as u32))?)
}

fn offsets(view: &View, block: usize) -> Result<Vec<usize>, ViewError> {
    if view.shape().len() != 1 || view.shape()[0] < 2 || view.dtype() != DType::I32 {
        return err("pb_offsets: expected a 1-D int32 tensor of at least 2 values");
    }
    let raw = view.to_i32_vec()?;
    let ok = raw[0] == 0 && raw.windows(2).all(|w| w[0] < w[1] && (w[1] - w[0]) as usize <= block);
    if !ok {
        return err(format!("pb_offsets: must rise from 0 in steps of 1..={block} rows"));
    }
    Ok(alloc::collect(raw.into_iter().map(|x| x as usize))?)
}

fn f32_values(view: &View, len: usize) -> Result<Vec<f32>, ViewError> {
    if view.shape() != [len] || view.dtype() != DType::F32 {
        return err(format!(
            "pbias: expected a float32 tensor of shape [{len}], got {:?} {:?}",
            view.dtype(), view.shape()
        ));
    }
    let values: Vec<f32> = alloc::collect((0..len).map(|i| view.load(&[i])))?;
    if values.iter().any(|x| !x.is_finite()) {
        return err("pbias: values must be finite");
    }
    Ok(values)
}

/// First pooled row of each level and the total: `[0, n_1, n_1 + n_2, ...]`, `n_l = ceil(n_{l-1} / block)`.
fn level_rows(n: usize, block: usize, levels: usize) -> Result<Vec<usize>, ViewError> {
    let mut rows = alloc::filled(1, 0usize)?;
    let mut size = n;
    for _ in 0..levels {
        size = size.div_ceil(block);
        let next = rows[rows.len() - 1] + size;
        alloc::push(&mut rows, next)?;
    }
    Ok(rows)
}

impl Plan {
    /// `fine (B, H, n_blocks, K_1)`, `pooled (B, H, n_blocks, E)` int32 block ids; `pb_offsets (M + 1,)` int32;
    /// `pbias (P,)` f32. Any inconsistency is an error.
    pub fn new(
        fine: &View,
        pooled: &View,
        pb_offsets: &View,
        pbias: &View,
        n: usize,
        block: usize,
        levels: usize,
    ) -> Result<Self, ViewError> {
        if block < 2 || n == 0 || levels == 0 {
            return err("block size must be >= 2, N and levels >= 1");
        }
        if fine.shape().len() != 4 || pooled.shape().len() != 4 {
            return err("fine and pooled selections must be 4-D (B, H, blocks, ids)");
        }
        let (batch, heads, n_blocks) = (fine.shape()[0], fine.shape()[1], n.div_ceil(block));
        let (k_fine, k_pooled) = (fine.shape()[3], pooled.shape()[3]);
        if k_fine == 0 || k_pooled == 0 {
            return err("every query block needs at least one fine and one pooled key block");
        }
        let pb_offsets = offsets(pb_offsets, block)?;
        let num_pooled_blocks = pb_offsets.len() - 1;
        let fine = ids(fine, "fine", [batch, heads, n_blocks, k_fine], n_blocks)?;
        let pooled = ids(pooled, "pooled", [batch, heads, n_blocks, k_pooled], num_pooled_blocks)?;
        let pooled_tokens = pb_offsets[num_pooled_blocks];
        let pbias = f32_values(pbias, pooled_tokens)?;
        let max_pooled_block = pb_offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let level_rows = level_rows(n, block, levels)?;
        if level_rows[levels] != pooled_tokens {
            return err(format!(
                "pb_offsets: {pooled_tokens} pooled rows, but {levels} levels of N={n} have {}",
                level_rows[levels]
            ));
        }
        Ok(Plan {
            batch_heads: batch * heads,
            n,
            block,
            n_blocks,
            k_fine,
            k_pooled,
            fine,
            pooled,
            pb_offsets,
            pbias,
            max_pooled_block,
            level_rows,
            rows: None,
            pooling: Pooling::default(),
        })
    }

    /// The plan with pooled tokens made by `pooling`.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// The plan reading and writing internal position `r` at row `perm[r]` of the fine tensors; `perm` is a 1-D
    /// int64 permutation of `0..N` (so every output row keeps exactly one writer).
    pub fn with_rows(mut self, perm: &View) -> Result<Self, ViewError> {
        let mut seen = alloc::filled(self.n, false)?;
        let ids = perm.to_i64_vec()?;
        let rows = if ids.iter().all(|&x| usize::try_from(x).is_ok_and(|r| r < self.n && !std::mem::replace(&mut seen[r], true))) {
            Some(alloc::collect(ids.into_iter().map(|x| x as usize))?)
        } else {
            None
        };
        match rows {
            Some(rows) if rows.len() == self.n => {
                self.rows = Some(rows);
                Ok(self)
            }
            _ => err(format!("{}: expected a permutation of 0..{}", perm.name(), self.n)),
        }
    }

    /// The fine tensors' row of internal position `r`.
    #[inline]
    pub fn row(&self, r: usize) -> usize {
        self.rows.as_ref().map_or(r, |rows| rows[r])
    }

    pub fn levels(&self) -> usize {
        self.level_rows.len() - 1
    }

    /// Fine tokens under each level-`level` token (`block^level`; the last token of a level counts what it has).
    pub fn span(&self, level: usize) -> usize {
        self.block.saturating_pow(level as u32)
    }

    /// Weight of fine token `token` in the value of its level-`level` ancestor (the mean-pool backward): `1 / count`
    /// of that ancestor pooling tokens; pooling children, `Π_{i ≤ level} 1 / children` of its ancestor at level i.
    pub fn pool_weight(&self, token: usize, level: usize) -> f32 {
        match self.pooling {
            Pooling::Tokens => {
                let span = self.span(level);
                1.0 / span.min(self.n - token / span * span) as f32
            }
            Pooling::Children => (1..=level).fold(1.0, |weight, l| {
                let below = if l == 1 { self.n } else { self.level_rows[l - 1] - self.level_rows[l - 2] };
                let first_child = token / self.span(l) * self.block;
                weight / self.block.min(below - first_child) as f32
            }),
        }
    }

    pub fn pooled_tokens(&self) -> usize {
        self.pb_offsets[self.pb_offsets.len() - 1]
    }

    /// `(first row, rows)` of fine block `p`.
    pub fn fine_block(&self, p: usize) -> (usize, usize) {
        let r0 = p * self.block;
        (r0, self.block.min(self.n - r0))
    }

    /// `(first row, rows)` of pooled block `p` in `kp`.
    pub fn pooled_block(&self, p: usize) -> (usize, usize) {
        (self.pb_offsets[p], self.pb_offsets[p + 1] - self.pb_offsets[p])
    }

    pub fn fine_ids(&self, bh: usize, j: usize) -> &[u32] {
        let at = (bh * self.n_blocks + j) * self.k_fine;
        &self.fine[at..at + self.k_fine]
    }

    pub fn pooled_ids(&self, bh: usize, j: usize) -> &[u32] {
        let at = (bh * self.n_blocks + j) * self.k_pooled;
        &self.pooled[at..at + self.k_pooled]
    }

    /// Most rows of one block: `min(block, N)` (a block size beyond N holds N rows; buffers are sized by this, not
    /// by the block size asked for).
    pub fn block_rows(&self) -> usize {
        self.block.min(self.n)
    }

    /// Most fine key rows of one query block.
    pub fn max_fine_rows(&self) -> usize {
        self.k_fine * self.block_rows()
    }

    /// Most pooled key rows of one query block.
    pub fn max_pooled_rows(&self) -> usize {
        self.k_pooled * self.max_pooled_block
    }

    /// Most query blocks in a group: the pooled logits of a group stay within `GROUP_BUDGET` floats.
    pub fn max_group(&self) -> usize {
        (GROUP_BUDGET / (self.block_rows() * self.max_pooled_rows()).max(1)).clamp(1, self.n_blocks.max(1))
    }

    /// Groups of `(b·h)`: runs `[j0, j1)` of consecutive query blocks with the same pooled blocks, at most
    /// `max_group()` long.
    pub fn groups(&self, bh: usize) -> Result<Vec<(usize, usize)>, ViewError> {
        let cap = self.max_group();
        let mut out = Vec::new();
        let mut j0 = 0;
        for j in 1..=self.n_blocks {
            if j == self.n_blocks || j - j0 == cap || self.pooled_ids(bh, j) != self.pooled_ids(bh, j0) {
                alloc::push(&mut out, (j0, j))?;
                j0 = j;
            }
        }
        Ok(out)
    }

    /// CSR transpose of the fine selection of `(b·h)`: for each fine key block, the query blocks that chose it in
    /// increasing order (`indptr` of `n_blocks + 1`, `indices`). Counts, prefix sum, fill.
    pub fn transpose(&self, bh: usize) -> Result<(Vec<usize>, Vec<u32>), ViewError> {
        let mut indptr = alloc::zeros::<usize>(self.n_blocks + 1)?;
        let rows = &self.fine[bh * self.n_blocks * self.k_fine..(bh + 1) * self.n_blocks * self.k_fine];
        for &p in rows {
            indptr[p as usize + 1] += 1;
        }
        for p in 0..self.n_blocks {
            indptr[p + 1] += indptr[p];
        }
        let mut fill = alloc::copy(&indptr)?;
        let mut indices = alloc::zeros::<u32>(rows.len())?;
        for (e, &p) in rows.iter().enumerate() {
            let slot = &mut fill[p as usize];
            indices[*slot] = (e / self.k_fine) as u32;
            *slot += 1;
        }
        Ok((indptr, indices))
    }
}
