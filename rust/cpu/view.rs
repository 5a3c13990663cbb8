//! Raw strided tensors handed over from Python, validated before any `unsafe` access.

use std::fmt;

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

/// A strided tensor: base address, element type, shape and strides (in elements).
#[derive(Clone, Debug)]
pub struct View {
    pub name: &'static str,
    pub ptr: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

// The kernels only read inputs and write disjoint rows of outputs; see `RowWriter`.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// Checks address, alignment, strides and that every element's offset fits in `isize`.
    pub fn new(name: &'static str, ptr: usize, dtype: &str, shape: Vec<usize>, strides: Vec<i64>) -> Result<Self, ViewError> {
        let dtype = DType::parse(dtype).map_err(|e| ViewError(format!("{name}: {e}")))?;
        if shape.len() != strides.len() {
            return Err(ViewError(format!("{name}: {} dims but {} strides", shape.len(), strides.len())));
        }
        let numel: usize = shape.iter().product();
        if numel > 0 && ptr == 0 {
            return Err(ViewError(format!("{name}: null data pointer")));
        }
        if ptr % dtype.size() != 0 {
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
        if span.checked_mul(dtype.size()).map_or(true, |b| b > isize::MAX as usize) {
            return Err(ViewError(format!("{name}: offsets overflow")));
        }
        Ok(View { name, ptr, dtype, shape, strides: ustrides })
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

    /// Offset (elements) of index `idx` (caller guarantees `idx[i] < shape[i]`).
    #[inline]
    pub fn offset(&self, idx: &[usize]) -> usize {
        idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum()
    }

    /// Reads the 1-D int64 contents (validated: 1 dim, int64).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, ViewError> {
        if self.shape.len() != 1 || self.dtype != DType::I64 {
            return Err(ViewError(format!("{}: expected a 1-D int64 tensor", self.name)));
        }
        let base = self.ptr as *const i64;
        // SAFETY: `new` checked alignment, that the base is non-null when non-empty and that every offset fits.
        Ok((0..self.shape[0]).map(|i| unsafe { *base.add(i * self.strides[0]) }).collect())
    }

    /// Reads the contents of an int32 / uint8 tensor of any rank in index order.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>, ViewError> {
        let numel: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(numel);
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..numel {
            let off = self.offset(&idx);
            // SAFETY: validated in `new`; `idx` stays inside `shape`.
            let value = unsafe {
                match self.dtype {
                    DType::I32 => *(self.ptr as *const i32).add(off),
                    DType::U8 => *(self.ptr as *const u8).add(off) as i32,
                    _ => return Err(ViewError(format!("{}: expected int32 or bool", self.name))),
                }
            };
            out.push(value);
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

    /// Reads `dst.len()` elements along the last dim at `idx` (all but last index) into f32.
    #[inline]
    pub fn load_row(&self, lead: &[usize], dst: &mut [f32]) {
        let base = self.offset(lead);
        let step = *self.strides.last().unwrap_or(&1);
        // SAFETY: `new` validated the view; callers pass in-range leading indices and `dst.len()` equal to the
        // last dim.
        unsafe {
            match self.dtype {
                DType::F32 => {
                    let p = (self.ptr as *const f32).add(base);
                    if step == 1 {
                        dst.copy_from_slice(std::slice::from_raw_parts(p, dst.len()));
                    } else {
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = *p.add(i * step);
                        }
                    }
                }
                DType::F16 => {
                    let p = (self.ptr as *const half::f16).add(base);
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = (*p.add(i * step)).to_f32();
                    }
                }
                DType::BF16 => {
                    let p = (self.ptr as *const half::bf16).add(base);
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = (*p.add(i * step)).to_f32();
                    }
                }
                _ => unreachable!("float views are checked by `expect`"),
            }
        }
    }

    /// Writes `src` along the last dim at `lead`, converting from f32.
    ///
    /// # Safety
    /// The caller must be the only writer of this row at this time, and the view must be a validated output.
    #[inline]
    pub unsafe fn store_row(&self, lead: &[usize], src: &[f32]) {
        let base = self.offset(lead);
        let step = *self.strides.last().unwrap_or(&1);
        match self.dtype {
            DType::F32 => {
                let p = (self.ptr as *mut f32).add(base);
                for (i, s) in src.iter().enumerate() {
                    *p.add(i * step) = *s;
                }
            }
            DType::F16 => {
                let p = (self.ptr as *mut half::f16).add(base);
                for (i, s) in src.iter().enumerate() {
                    *p.add(i * step) = half::f16::from_f32(*s);
                }
            }
            DType::BF16 => {
                let p = (self.ptr as *mut half::bf16).add(base);
                for (i, s) in src.iter().enumerate() {
                    *p.add(i * step) = half::bf16::from_f32(*s);
                }
            }
            _ => unreachable!("float views are checked by `expect`"),
        }
    }

    /// Writes one f32 at a 3-D index (lse rows).
    ///
    /// # Safety
    /// As for [`View::store_row`].
    #[inline]
    pub unsafe fn store_f32(&self, idx: &[usize], value: f32) {
        *(self.ptr as *mut f32).add(self.offset(idx)) = value;
    }

    /// Reads one f32 at an index (f32 views only).
    #[inline]
    pub fn load_f32(&self, idx: &[usize]) -> f32 {
        // SAFETY: validated view, in-range index, f32 dtype checked by callers.
        unsafe { *(self.ptr as *const f32).add(self.offset(idx)) }
    }
}
