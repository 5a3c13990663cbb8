//! What the attention kernels share: the base-2 softmax constants, the shapes of a call, the checks of inputs
//! and outputs, and the row gather through a permutation.

use super::view::{err, DType, View, ViewError};

/// Logits are scaled by `log2 e` so the softmax runs on `exp2`; log-sum-exps go back to natural log by `ln 2`.
pub const LOG2_E: f32 = std::f32::consts::LOG2_E;
pub const LN_2: f32 = std::f32::consts::LN_2;

/// The shapes of an attention call: `q (B, H, N, D)`, `v (…, Dv)` (the key count is each kernel's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    /// The `(b, h)` slices, `B·H`.
    pub fn slices(&self) -> usize {
        self.batch * self.heads
    }

    /// `(b, h)` of slice `bh`.
    pub fn slice(&self, bh: usize) -> (usize, usize) {
        (bh / self.heads, bh % self.heads)
    }
}

/// An input of `shape` and `dtype` (any float dtype when `None`).
pub fn check_input(t: &View, shape: &[usize], dtype: impl Into<Option<DType>>) -> Result<(), ViewError> {
    let dtype = dtype.into();
    let ok = t.shape() == shape && dtype.map_or(t.dtype().is_float(), |want| want == t.dtype());
    if !ok {
        let want = dtype.map_or("a float dtype".to_string(), |d| format!("{d:?}"));
        return err(format!("{}: expected shape {shape:?} and {want}, got {:?} {:?}", t.name(), t.shape(), t.dtype()));
    }
    Ok(())
}

/// An output: as [`check_input`], and contiguous (so the rows that different tasks write never overlap).
pub fn check_output(t: &View, shape: &[usize], dtype: impl Into<Option<DType>>) -> Result<(), ViewError> {
    check_input(t, shape, dtype)?;
    t.expect_contiguous()
}

/// Gathers the rows `rows` (in that order) of slice `(b, h)` of a `(B, H, N, width)` float view into `dst`
/// (`rows x width`, row-major), times `mul`.
#[inline]
pub fn gather(t: &View, (b, h): (usize, usize), rows: impl IntoIterator<Item = usize>, width: usize, mul: f32, dst: &mut [f32]) {
    for (r, row) in rows.into_iter().enumerate() {
        let out = &mut dst[r * width..(r + 1) * width];
        t.load_row(&[b, h, row], out);
        if mul != 1.0 {
            out.iter_mut().for_each(|x| *x *= mul);
        }
    }
}
