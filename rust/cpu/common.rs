//! What the attention kernels share: the base-2 softmax constants, the shapes of a call, the online softmax, the
//! checks of inputs and outputs, and the row gather through a permutation.

use super::isa::Isa;
use super::view::{err, DType, View, ViewError};
use super::vmath::{self, exp2_shift_sum};

pub use crate::alloc::OUT_OF_MEMORY;
use crate::alloc::{self, AllocError};

impl From<AllocError> for ViewError {
    fn from(e: AllocError) -> Self {
        ViewError(e.0)
    }
}

/// `len` zeros, or an error where the allocation fails: buffers sized by the shapes of a call never abort the
/// process ("memory allocation failed" is an abort in Rust's infallible `vec!`).
pub fn zeros<T: Clone + Default>(len: usize) -> Result<Vec<T>, ViewError> {
    Ok(alloc::zeros(len)?)
}

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

/// The running state of an online softmax over rows of base-2 logits (FlashAttention's): per row the max `m` and
/// the denominator `l` so far, and the numerator `acc` (`rows x width`, row-major), which the caller adds `P·V` to.
pub struct OnlineSoftmax {
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    pub acc: Vec<f32>,
    width: usize,
}

impl OnlineSoftmax {
    pub fn new(rows: usize, width: usize) -> Result<Self, ViewError> {
        Ok(OnlineSoftmax { m: zeros(rows)?, l: zeros(rows)?, acc: zeros(alloc::size(&[rows, width])?)?, width })
    }

    /// Starts `rows` rows afresh: nothing seen yet.
    pub fn reset(&mut self, rows: usize) {
        self.m[..rows].fill(f32::NEG_INFINITY);
        self.l[..rows].fill(0.0);
        self.acc[..rows * self.width].fill(0.0);
    }

    /// Folds the logits `mul · s` (`s`: `rows x cols`, row-major; `mul > 0`, applied without a pass of its own) in:
    /// turns them into probabilities `2^(mul·s − m)` against the
    /// new row maxima and rescales `l` and `acc` by `alpha = 2^(m_old − m_new)` where the max rose. `each(r, p,
    /// alpha, sum)` sees every row's probabilities, `alpha` and the probabilities' sum (for the caller's own running
    /// sums).
    ///
    /// NaN: the max skips NaN logits (as `maxps` and Triton's `tl.max` do), so a NaN logit reaches the output
    /// through its probability `2^(NaN − m) = NaN` and the sums, as in a plain softmax; only masked (−∞) logits
    /// vanish. A row with no finite logit so far is shifted by 0 (its −∞ logits give exact zeros, never
    /// `−∞ − (−∞)`), not skipped, so an all-NaN row stays NaN.
    #[inline(always)]
    pub fn update(&mut self, s: &mut [f32], rows: usize, cols: usize, mul: f32, mut each: impl FnMut(usize, &[f32], f32, f32)) {
        let width = self.width;
        for r in 0..rows {
            let row = &mut s[r * cols..(r + 1) * cols];
            // Rounding is monotonic, so for mul > 0 the largest scaled logit is the scaled largest logit.
            let m_new = self.m[r].max(vmath::max(row) * mul);
            let shift = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
            let alpha = if self.m[r] == f32::NEG_INFINITY { 0.0 } else { (self.m[r] - m_new).exp2() };
            let sum = if mul == 1.0 { exp2_shift_sum(row, shift) } else { vmath::exp2_scaled_shift_sum(row, mul, shift) };
            self.l[r] = self.l[r] * alpha + sum;
            each(r, row, alpha, sum);
            self.m[r] = m_new;
            if alpha != 1.0 {
                vmath::scale(&mut self.acc[r * width..(r + 1) * width], alpha);
            }
        }
    }

    /// `1 / l` of row `r`, 0 for a row that saw no allowed key (NaN for a row that saw a NaN logit).
    pub fn inverse(&self, r: usize) -> f32 {
        let l = self.l[r];
        if l == 0.0 {
            0.0
        } else {
            1.0 / l
        }
    }

    /// The natural log of row `r`'s softmax denominator (−∞ for a row that saw no allowed key, NaN for a row that
    /// saw a NaN logit, so that its backward is NaN too).
    pub fn log_denominator(&self, r: usize) -> f32 {
        let l = self.l[r];
        if l == 0.0 {
            f32::NEG_INFINITY
        } else {
            (self.m[r] + l.log2()) * LN_2
        }
    }
}

/// The instruction-set level in use, or the error of a bad `DIFATTN_CPU_ISA` (every kernel entry point checks it).
pub fn active_isa() -> Result<Isa, ViewError> {
    Isa::active().map_err(ViewError)
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

/// Gathers the rows `rows` (in that order) of slice `(b, h)` of a `(B, H, N, W)` float view into `dst`
/// (`rows x W`, row-major), times `mul`.
#[inline]
pub fn gather(t: &View, (b, h): (usize, usize), rows: impl IntoIterator<Item = usize>, mul: f32, dst: &mut [f32]) {
    let count = t.load_rows(&[b, h], rows, dst);
    if mul != 1.0 {
        dst[..count * t.shape()[3]].iter_mut().for_each(|x| *x *= mul);
    }
}
