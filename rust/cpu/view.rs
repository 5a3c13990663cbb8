//! Raw strided tensors handed over from Python, validated before any `unsafe` access.

use std::fmt;

use super::matmul::Mat;
use super::vmath;

/// Element types the kernels read and write (computation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
}

impl DType {
    pub fn parse(name: &str) -> Result<Self, ViewError> {
        Ok(match name {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" => DType::I64,
            "int32" => DType::I32,
            "uint8" | "bool" => DType::U8,
            other => return Err(ViewError(format!("unsupported dtype {other}"))),
        })
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

/// A descriptor that cannot be read safely, or does not match what the kernel expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewError(pub String);

/// `Err(ViewError(msg))`: the kernels' validation failures, raised as `ValueError` by the Python layer.
pub fn err<T>(msg: impl Into<String>) -> Result<T, ViewError> {
    Err(ViewError(msg.into()))
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ViewError {}

/// A strided tensor: base address, element type, shape and strides (in elements), checked by [`View::new`].
///
/// The address is a plain number, so a view is `Send` and `Sync`; what makes sharing it sound is the contract of
/// its `unsafe` writers (`store_*`): a caller writes only elements that no other thread reads or writes meanwhile.
/// Its readers check every index against the shape (a bad index panics, it never reads out of bounds).
#[derive(Clone, Debug)]
pub struct View {
    name: &'static str,
    ptr: usize,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl View {
    /// Checks address, alignment, strides and that every element's offset fits in `isize`. The caller (the
    /// Python layer) vouches that the descriptor is a live tensor: every element inside `shape` is addressable,
    /// and inputs are not written while a kernel reads them.
    pub fn new(name: &'static str, ptr: usize, dtype: &str, shape: Vec<usize>, strides: Vec<i64>) -> Result<Self, ViewError> {
        let dtype = DType::parse(dtype).map_err(|e| ViewError(format!("{name}: {e}")))?;
        if shape.len() != strides.len() {
            return Err(ViewError(format!("{name}: {} dims but {} strides", shape.len(), strides.len())));
        }
        let numel: usize = shape.iter().product();
        if numel > 0 && ptr == 0 {
            return Err(ViewError(format!("{name}: null data pointer")));
        }
        if !ptr.is_multiple_of(dtype.size()) {
            return Err(ViewError(format!("{name}: data pointer not aligned to {} bytes", dtype.size())));
        }
        let mut span: usize = 0;
        let mut ustrides = Vec::with_capacity(strides.len());
        for (&n, &s) in shape.iter().zip(&strides) {
            let s = usize::try_from(s).map_err(|_| ViewError(format!("{name}: negative stride {s}")))?;
            if n > 0 {
                span = (n - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(span))
                    .ok_or_else(|| ViewError(format!("{name}: offsets overflow")))?;
            }
            ustrides.push(s);
        }
        if span.checked_mul(dtype.size()).is_none_or(|b| b > isize::MAX as usize) {
            return Err(ViewError(format!("{name}: offsets overflow")));
        }
        Ok(View { name, ptr, dtype, shape, strides: ustrides })
    }

    /// The argument name, for error messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn expect(&self, dims: usize, float: bool) -> Result<(), ViewError> {
        if self.shape.len() != dims {
            return Err(ViewError(format!("{}: expected {dims} dims, got {:?}", self.name, self.shape)));
        }
        if float != self.dtype.is_float() {
            return Err(ViewError(format!("{}: unexpected dtype {:?}", self.name, self.dtype)));
        }
        Ok(())
    }

    /// Writable outputs must not alias themselves: strides of a contiguous tensor, innermost last.
    pub fn expect_contiguous(&self) -> Result<(), ViewError> {
        let mut expected = 1usize;
        for (n, s) in self.shape.iter().zip(&self.strides).rev() {
            if *n > 1 && *s != expected {
                return Err(ViewError(format!("{}: output must be contiguous", self.name)));
            }
            expected *= n;
        }
        Ok(())
    }

    /// Offset (elements) of the leading indices `idx` (the first `idx.len()` dims), and whether they lie inside
    /// the shape (the offset means nothing otherwise).
    #[inline(always)]
    fn prefix_offset(&self, idx: &[usize]) -> (usize, bool) {
        let (mut off, mut inside) = (0usize, idx.len() <= self.shape.len());
        for ((&i, &n), &s) in idx.iter().zip(&self.shape).zip(&self.strides) {
            inside &= i < n;
            off = off.wrapping_add(i.wrapping_mul(s));
        }
        (off, inside)
    }

    /// Offset (elements) of the full index `idx`. Panics unless `idx` lies inside the shape, so the offset is
    /// one of the element offsets `new` checked.
    #[inline(always)]
    fn offset(&self, idx: &[usize]) -> usize {
        let (off, inside) = self.prefix_offset(idx);
        if !inside || idx.len() != self.shape.len() {
            self.outside(idx, None);
        }
        off
    }

    /// Offset (elements) of element `start` of the last-dim row at `lead` (all indices but the last), and the
    /// last dim's stride. Panics unless `lead` lies inside the shape and the row holds elements `start..start +
    /// len` (exactly those when `whole`).
    #[inline(always)]
    fn span_offset(&self, lead: &[usize], start: usize, len: usize, whole: bool) -> (usize, usize) {
        let (off, inside) = self.prefix_offset(lead);
        let last = self.shape.len().wrapping_sub(1);
        let fits = if whole { start == 0 && self.shape[last] == len } else { start.checked_add(len).is_some_and(|end| end <= self.shape[last]) };
        if !inside || lead.len() != last || !fits {
            self.outside(lead, Some(len));
        }
        (off + start * self.strides[last], self.strides[last])
    }

    /// The panic of a bad index (a kernel bug: kernels index validated views within their checked shapes).
    #[cold]
    #[inline(never)]
    fn outside(&self, idx: &[usize], row: Option<usize>) -> ! {
        match row {
            Some(len) => panic!("{}: row {idx:?} of {len} values outside the shape {:?}", self.name, self.shape),
            None => panic!("{}: index {idx:?} outside the shape {:?}", self.name, self.shape),
        }
    }

    /// Reads the 1-D int64 contents (validated: 1 dim, int64).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, ViewError> {
        if self.shape.len() != 1 || self.dtype != DType::I64 {
            return Err(ViewError(format!("{}: expected a 1-D int64 tensor", self.name)));
        }
        Ok(crate::alloc::collect((0..self.shape[0]).map(|i| self.load_i64(&[i])))?)
    }

    /// Reads the contents of an int32 / uint8 tensor of any rank in index order.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>, ViewError> {
        if !matches!(self.dtype, DType::I32 | DType::U8) {
            return Err(ViewError(format!("{}: expected int32 or bool", self.name)));
        }
        let numel: usize = self.shape.iter().product();
        let mut out = crate::alloc::with_capacity(numel)?;
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..numel {
            let off = self.offset(&idx);
            out.push(if self.dtype == DType::I32 {
                // SAFETY: an in-shape element (`offset` checked the index, `new` its offset) of an int32 view.
                unsafe { *(self.ptr as *const i32).add(off) }
            } else {
                // SAFETY: an in-shape element (`offset` checked the index, `new` its offset) of a uint8 view.
                unsafe { *(self.ptr as *const u8).add(off) as i32 }
            });
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }

    /// Reads the last-dim row at `lead` (all indices but the last) into `dst`, converted to f32. Panics unless
    /// the view is float, `lead` lies inside the shape and `dst.len()` is the last dim.
    #[inline(always)]
    pub fn load_row(&self, lead: &[usize], dst: &mut [f32]) {
        let (base, step) = self.span_offset(lead, 0, dst.len(), true);
        // SAFETY: `span_offset` checked that `base + i·step`, `i < dst.len()`, are the offsets of the row's
        // in-shape elements.
        unsafe { self.read(base, step, dst) };
    }

    /// Reads elements `start..start + dst.len()` of the last-dim row at `lead` (all indices but the last) into
    /// `dst`, converted to f32. Panics unless the view is float and they lie inside the shape.
    #[inline(always)]
    pub fn load_span(&self, lead: &[usize], start: usize, dst: &mut [f32]) {
        let (base, step) = self.span_offset(lead, start, dst.len(), false);
        // SAFETY: `span_offset` checked that `base + i·step`, `i < dst.len()`, are the offsets of in-shape
        // elements.
        unsafe { self.read(base, step, dst) };
    }

    /// Reads the last-dim rows `rows` (indices into the second-to-last dim, in that order) at the leading indices
    /// `lead` (all dims but the last two) into `dst`, `W` values per row (the last dim), converted to f32; returns
    /// how many rows it read. Panics unless the view is float, `lead` and every row lie inside the shape and `dst`
    /// holds the rows. One check of `lead` per call, one compare per row. Where the rows are stored back to back
    /// (unit last stride, row stride `W`), a run of consecutive row indices is read as one span (image tiles are
    /// runs of a grid's rows: a few long copies or conversions instead of one short one per row).
    #[inline]
    pub fn load_rows(&self, lead: &[usize], rows: impl IntoIterator<Item = usize>, dst: &mut [f32]) -> usize {
        let nd = self.shape.len();
        let (base, inside) = self.prefix_offset(lead);
        if !inside || lead.len() + 2 != nd {
            self.outside(lead, None);
        }
        let (n, w, rs, step) = (self.shape[nd - 2], self.shape[nd - 1], self.strides[nd - 2], self.strides[nd - 1]);
        let packed = step == 1 && rs == w;
        // The pending run: rows `first..first + len` of the view, to land at row `at` of `dst`.
        let (mut first, mut len, mut at) = (0, 0, 0);
        let mut count = 0;
        for row in rows {
            if row >= n {
                self.outside(&[row], None);
            }
            if len > 0 && !(packed && row == first + len) {
                // SAFETY: rows `first..first + len` lie inside the shape (each checked above) and are either one
                // row (`len == 1`) or consecutive rows stored back to back (`packed`), so `base + first·rs + i`,
                // `i < len·W`, are offsets of in-shape elements (with `step` for one row).
                unsafe { self.read(base + first * rs, step, &mut dst[at * w..(at + len) * w]) };
                (at, len) = (at + len, 0);
            }
            if len == 0 {
                first = row;
            }
            len += 1;
            count += 1;
        }
        if len > 0 {
            // SAFETY: as for the runs above.
            unsafe { self.read(base + first * rs, step, &mut dst[at * w..(at + len) * w]) };
        }
        count
    }

    /// `dst[i] = element at offset base + i·step`, converted to f32. Panics unless the view is float.
    ///
    /// # Safety
    /// `base + i·step` must be the offset of an in-shape element for every `i < dst.len()`.
    #[inline(always)]
    unsafe fn read(&self, base: usize, step: usize, dst: &mut [f32]) {
        match self.dtype {
            DType::F32 if step == 1 => {
                // SAFETY: by the contract, `dst.len()` consecutive in-shape f32 elements from `base` (their
                // offsets checked by `new`).
                let row = unsafe { std::slice::from_raw_parts((self.ptr as *const f32).add(base), dst.len()) };
                dst.copy_from_slice(row);
            }
            // SAFETY: an f32 view, and the offsets are in-shape elements (the contract).
            DType::F32 => unsafe { self.read_row::<f32>(base, step, dst, |x| x) },
            // SAFETY: an f16 view; the offsets as for f32.
            DType::F16 => unsafe { self.read_row(base, step, dst, half::f16::to_f32) },
            DType::BF16 if step == 1 => {
                // SAFETY: by the contract, `dst.len()` consecutive in-shape bf16 elements from `base` (offsets
                // checked by `new`, aligned for u16), read as their bits.
                let row = unsafe { std::slice::from_raw_parts((self.ptr as *const u16).add(base), dst.len()) };
                vmath::bf16_to_f32(row, dst);
            }
            // SAFETY: a bf16 view; the offsets as for f32.
            DType::BF16 => unsafe { self.read_row(base, step, dst, half::bf16::to_f32) },
            other => panic!("{}: reading rows of a {other:?} view", self.name),
        }
    }

    /// `dst[i] = convert(element at offset base + i·step)`.
    ///
    /// # Safety
    /// The view's elements have type `T`, and `base + i·step` is the offset of an in-shape element for every
    /// `i < dst.len()`.
    #[inline(always)]
    unsafe fn read_row<T: Copy>(&self, base: usize, step: usize, dst: &mut [f32], convert: impl Fn(T) -> f32) {
        let p = self.ptr as *const T;
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: by the contract an in-shape element of type `T`, whose offset `new` checked (and whose
            // address is aligned: `new` checked the base address, and offsets count whole elements).
            *d = convert(unsafe { *p.add(base + i * step) });
        }
    }

    /// Writes `src` to the last-dim row at `lead`, converted from f32. Panics unless the view is float, `lead`
    /// lies inside the shape and `src.len()` is the last dim.
    ///
    /// # Safety
    /// No other thread may read or write this row while the call runs (each output row has one writer), and the
    /// view must be writable (an output the caller owns for the kernel's duration).
    #[inline(always)]
    pub unsafe fn store_row(&self, lead: &[usize], src: &[f32]) {
        let (base, step) = self.span_offset(lead, 0, src.len(), true);
        // SAFETY: `span_offset` checked that `base + i·step`, `i < src.len()`, are the offsets of the row's
        // in-shape elements, which the caller owns for this call (this function's contract).
        unsafe { self.write(base, step, src) };
    }

    /// Writes `src` to elements `start..start + src.len()` of the last-dim row at `lead`, converted from f32.
    /// Panics unless the view is float and they lie inside the shape.
    ///
    /// # Safety
    /// As for [`View::store_row`], for these elements.
    #[inline(always)]
    pub unsafe fn store_span(&self, lead: &[usize], start: usize, src: &[f32]) {
        let (base, step) = self.span_offset(lead, start, src.len(), false);
        // SAFETY: `span_offset` checked that `base + i·step`, `i < src.len()`, are the offsets of in-shape
        // elements, which the caller owns for this call (this function's contract).
        unsafe { self.write(base, step, src) };
    }

    /// `element at offset base + i·step = src[i]`, converted from f32. Panics unless the view is float.
    ///
    /// # Safety
    /// `base + i·step` must be the offset of an in-shape element for every `i < src.len()`, and no other thread
    /// may read or write these elements during the call.
    #[inline(always)]
    unsafe fn write(&self, base: usize, step: usize, src: &[f32]) {
        match self.dtype {
            // SAFETY: an f32 view; the offsets are in-shape elements this call alone accesses (the contract).
            DType::F32 => unsafe { self.write_row::<f32>(base, step, src, |x| x) },
            // SAFETY: an f16 view; the offsets and their ownership as for f32.
            DType::F16 => unsafe { self.write_row(base, step, src, half::f16::from_f32) },
            DType::BF16 if step == 1 => {
                // SAFETY: by the contract, `src.len()` consecutive in-shape bf16 elements from `base` (offsets
                // checked by `new`, aligned for u16) that this call alone accesses, written as their bits.
                let row = unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut u16).add(base), src.len()) };
                vmath::f32_to_bf16(src, row);
            }
            // SAFETY: a bf16 view; the offsets and their ownership as for f32.
            DType::BF16 => unsafe { self.write_row(base, step, src, half::bf16::from_f32) },
            other => panic!("{}: writing rows of a {other:?} view", self.name),
        }
    }

    /// `element at offset base + i·step = convert(src[i])`.
    ///
    /// # Safety
    /// As for [`View::read_row`], and no other thread reads or writes these elements during the call.
    #[inline(always)]
    unsafe fn write_row<T: Copy>(&self, base: usize, step: usize, src: &[f32], convert: impl Fn(f32) -> T) {
        let p = self.ptr as *mut T;
        for (i, s) in src.iter().enumerate() {
            // SAFETY: by the contract an in-shape element of type `T` (aligned, offset checked by `new`) that this
            // call alone accesses.
            unsafe { *p.add(base + i * step) = convert(*s) };
        }
    }

    /// Reads one element at the full index `idx`, converted to f32. Panics unless the view is float and `idx`
    /// lies inside the shape.
    #[inline(always)]
    pub fn load(&self, idx: &[usize]) -> f32 {
        let off = self.offset(idx);
        match self.dtype {
            // SAFETY: an in-shape element (`offset` checked the index, `new` its offset) of an f32 view.
            DType::F32 => unsafe { *(self.ptr as *const f32).add(off) },
            // SAFETY: an in-shape element (`offset` checked the index, `new` its offset) of an f16 view.
            DType::F16 => unsafe { *(self.ptr as *const half::f16).add(off) }.to_f32(),
            // SAFETY: an in-shape element (`offset` checked the index, `new` its offset) of a bf16 view.
            DType::BF16 => unsafe { *(self.ptr as *const half::bf16).add(off) }.to_f32(),
            other => panic!("{}: load of a {other:?} view", self.name),
        }
    }

    /// Reads one element of an int64 view at the full index `idx`. Panics unless the view is int64 and `idx`
    /// lies inside the shape.
    #[inline]
    pub fn load_i64(&self, idx: &[usize]) -> i64 {
        assert_eq!(self.dtype, DType::I64, "{}: load_i64 of a {:?} view", self.name, self.dtype);
        let off = self.offset(idx);
        // SAFETY: an in-shape element (`offset`, `new`) of an int64 view.
        unsafe { *(self.ptr as *const i64).add(off) }
    }

    /// Writes one f32 at the full index `idx`. Panics unless the view is f32 and `idx` lies inside the shape.
    ///
    /// # Safety
    /// As for [`View::store_row`], for this element.
    #[inline(always)]
    pub unsafe fn store_f32(&self, idx: &[usize], value: f32) {
        assert_eq!(self.dtype, DType::F32, "{}: store_f32 of a {:?} view", self.name, self.dtype);
        let off = self.offset(idx);
        // SAFETY: an in-shape element (`offset`, `new`) of an f32 view, owned by the caller for this call.
        unsafe { *(self.ptr as *mut f32).add(off) = value };
    }

    /// Writes one int64 at the full index `idx`. Panics unless the view is int64 and `idx` lies inside the shape.
    ///
    /// # Safety
    /// As for [`View::store_row`], for this element.
    #[inline]
    pub unsafe fn store_i64(&self, idx: &[usize], value: i64) {
        assert_eq!(self.dtype, DType::I64, "{}: store_i64 of a {:?} view", self.name, self.dtype);
        let off = self.offset(idx);
        // SAFETY: an in-shape element (`offset`, `new`) of an int64 view, owned by the caller for this call.
        unsafe { *(self.ptr as *mut i64).add(off) = value };
    }

    /// The f32 matrix over the last two dims from the full index `first`: element `(i, j)` is the view's element
    /// at `first` plus `i` in the second-to-last dim and `j` in the last, for every such element in the shape.
    /// Panics unless the view is f32 with at least 2 dims and `first` lies inside the shape.
    pub fn matrix(&self, first: &[usize]) -> Mat<'_> {
        assert!(self.dtype == DType::F32 && self.shape.len() >= 2, "{}: matrix of a {:?} view", self.name, self.dtype);
        let off = self.offset(first);
        let nd = self.shape.len();
        let (rows, cols) = (self.shape[nd - 2] - first[nd - 2], self.shape[nd - 1] - first[nd - 1]);
        // SAFETY: element (i, j), i < rows, j < cols, is the in-shape element at `first` plus (i, j) in the last two
        // dims, at offset `off + i·strides[-2] + j·strides[-1]`: checked by `new`, vouched for by the caller, and an
        // input nothing writes while the kernels read it (the returned matrix borrows the view).
        unsafe {
            Mat::from_raw((self.ptr as *const f32).add(off), rows, cols, self.strides[nd - 2], self.strides[nd - 1])
        }
    }

    /// Rows `lead[-1] .. lead[-1] + rows` of the last dim at the leading indices `lead[..-1]` as one slice of
    /// `rows x W` f32 values, when they are consecutive in memory (an f32 view with unit last stride and row
    /// stride `W`, or a single row); `None` otherwise, and when the rows leave the shape or `rows` is 0.
    pub fn f32_rows(&self, lead: &[usize], rows: usize) -> Option<&[f32]> {
        let start = self.consecutive_rows(lead, rows)?;
        // SAFETY: `consecutive_rows` checked that these `rows·W` elements are in-shape (checked by `new`, vouched
        // for by the caller) and consecutive f32 values from `start`; an input nothing writes while the kernels
        // read it (the slice borrows the view).
        Some(unsafe { std::slice::from_raw_parts((self.ptr as *const f32).add(start), rows * self.shape[lead.len()]) })
    }

    /// The rows of [`View::f32_rows`] of a bf16 view, as the bits of its values.
    pub fn bf16_rows(&self, lead: &[usize], rows: usize) -> Option<&[u16]> {
        let start = self.consecutive_rows_of(DType::BF16, lead, rows)?;
        // SAFETY: `consecutive_rows_of` checked that these `rows·W` elements are in-shape (checked by `new`,
        // vouched for by the caller) and consecutive bf16 values from `start` (2-byte aligned, checked by `new`); an
        // input nothing writes while the kernels read it (the slice borrows the view).
        Some(unsafe { std::slice::from_raw_parts((self.ptr as *const u16).add(start), rows * self.shape[lead.len()]) })
    }

    /// The rows of [`View::f32_rows`], writable.
    ///
    /// # Safety
    /// As for [`View::store_row`], for these rows and for as long as the slice lives.
    #[allow(clippy::mut_from_ref)] // the caller's exclusive ownership of the rows is this function's contract
    pub unsafe fn f32_rows_mut(&self, lead: &[usize], rows: usize) -> Option<&mut [f32]> {
        let start = self.consecutive_rows(lead, rows)?;
        let len = rows * self.shape[lead.len()];
        // SAFETY: as in `f32_rows`, and the caller owns these elements exclusively while the slice lives.
        Some(unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut f32).add(start), len) })
    }

    /// The rows of [`View::bf16_rows`], writable.
    ///
    /// # Safety
    /// As for [`View::store_row`], for these rows and for as long as the slice lives.
    #[allow(clippy::mut_from_ref)] // the caller's exclusive ownership of the rows is this function's contract
    pub unsafe fn bf16_rows_mut(&self, lead: &[usize], rows: usize) -> Option<&mut [u16]> {
        let start = self.consecutive_rows_of(DType::BF16, lead, rows)?;
        let len = rows * self.shape[lead.len()];
        // SAFETY: as in `bf16_rows`, and the caller owns these elements exclusively while the slice lives.
        Some(unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut u16).add(start), len) })
    }

    /// Offset of the first of `rows` consecutive last-dim rows of an f32 view (see [`View::f32_rows`]), or `None`.
    fn consecutive_rows(&self, lead: &[usize], rows: usize) -> Option<usize> {
        self.consecutive_rows_of(DType::F32, lead, rows)
    }

    /// Asks the CPU to bring rows `lead[-1] .. lead[-1] + rows` of the last dim into its caches, when they are
    /// consecutive in memory (any dtype; see [`View::f32_rows`]); nothing otherwise. Only a hint: nothing is read
    /// or written. For loops that stream rows: the CPU's own prefetcher stops at page bounds.
    pub fn prefetch_rows(&self, lead: &[usize], rows: usize) {
        let Some(start) = self.consecutive_rows_of(self.dtype, lead, rows) else { return };
        let (size, len) = (self.dtype.size(), rows * self.shape[lead.len()]);
        #[cfg(target_arch = "x86_64")]
        for at in (0..len * size).step_by(64) {
            let line = (self.ptr as *const i8).wrapping_add(start * size + at);
            // SAFETY: SSE, which `_mm_prefetch` needs, is part of x86_64; a prefetch reads nothing and never
            // faults (the address lies inside the checked rows anyway).
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (start, size, len);
    }

    /// [`View::consecutive_rows`] of a view of `dtype`.
    fn consecutive_rows_of(&self, dtype: DType, lead: &[usize], rows: usize) -> Option<usize> {
        let nd = self.shape.len();
        if self.dtype != dtype || nd < 2 || lead.len() != nd - 1 || rows == 0 {
            return None;
        }
        let w = self.shape[nd - 1];
        let inside = lead[..nd - 2].iter().zip(&self.shape).all(|(i, n)| i < n)
            && lead[nd - 2].checked_add(rows).is_some_and(|end| end <= self.shape[nd - 2]);
        let consecutive = self.strides[nd - 1] == 1 && (rows == 1 || self.strides[nd - 2] == w);
        (inside && consecutive && w > 0).then(|| lead.iter().zip(&self.strides).map(|(i, s)| i * s).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::{contiguous_strides, view_of};

    #[test]
    fn load_rows_reads_runs_and_single_rows_alike() {
        // (1, 2, 9, 3): runs of consecutive rows (read as one span), repeats, descending and lone rows, for f32,
        // bf16 and a view whose rows are not back to back (the last dim strided): each row as `load_row` reads it.
        let (shape, lead) = ([1usize, 2, 9, 3], [0usize, 1]);
        let values: Vec<f32> = (0..54).map(|i| i as f32 * 0.5 - 7.0).collect();
        let bf16: Vec<u16> = values.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let wide: Vec<f32> = values.iter().flat_map(|&x| [x, -1.0]).collect();
        let strided = View::new("strided", wide.as_ptr() as usize, "float32", shape.to_vec(),
                                contiguous_strides(&shape).iter().map(|s| 2 * s).collect()).unwrap();
        let views = [view_of("f32", &values, "float32", &shape), view_of("bf16", &bf16, "bfloat16", &shape), strided];
        let rows = [2usize, 3, 4, 7, 8, 8, 5, 4, 0, 1];
        for t in &views {
            let mut got = vec![f32::NAN; rows.len() * 3];
            assert_eq!(t.load_rows(&lead, rows, &mut got), rows.len());
            for (r, &row) in rows.iter().enumerate() {
                let mut want = [0.0f32; 3];
                t.load_row(&[0, 1, row], &mut want);
                assert_eq!(got[r * 3..(r + 1) * 3], want, "{}: row {row}", t.name);
            }
        }
        let past_the_end = std::panic::catch_unwind(|| views[0].load_rows(&lead, [7, 8, 9], &mut [0.0; 9]));
        assert!(past_the_end.is_err());
    }
}
