//! The kernels' GEMM front: `dst = [dst +] lhs · rhs` over strided f32 matrices through the `gemm` crate (which
//! dispatches on CPU features at run time). Operands are made from slices, or from validated views
//! ([`crate::cpu::view::View::matrix`]), and remember what they may address, so a product is a safe call: [`Gemm::run`]
//! checks its sizes against every operand before `gemm` reads or writes anything. Element-wise math lives in
//! `vmath`.

use std::marker::PhantomData;

/// The elements an operand may address: offsets (in elements from its start) below `Len`, or the index box
/// `rows x cols` (a view's elements, whatever its strides).
#[derive(Clone, Copy, Debug)]
enum Extent {
    Len(usize),
    Box(usize, usize),
}

/// Whether `rows x cols` elements at strides `(rs, cs)` lie inside `extent` (strides that do not fit in `isize`,
/// which `gemm` takes, never do).
fn covers(extent: Extent, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rs > isize::MAX as usize || cs > isize::MAX as usize {
        return false;
    }
    if rows == 0 || cols == 0 {
        return true;
    }
    match extent {
        Extent::Len(len) => (rows - 1)
            .checked_mul(rs)
            .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)))
            .is_some_and(|last| last < len),
        Extent::Box(r, c) => rows <= r && cols <= c,
    }
}

/// A read-only f32 matrix operand: element `(i, j)` at `i·rs + j·cs` elements from its start.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    ptr: *const f32,
    rs: usize,
    cs: usize,
    extent: Extent,
    _data: PhantomData<&'a [f32]>,
}

impl<'a> Mat<'a> {
    /// Rows of `data` at row stride `ld`: element `(i, j)` is `data[i·ld + j]`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Mat { ptr: data.as_ptr(), rs: ld, cs: 1, extent: Extent::Len(data.len()), _data: PhantomData }
    }

    /// The transpose: element `(i, j)` of the result is element `(j, i)` of `self`.
    pub fn t(self) -> Self {
        let extent = match self.extent {
            Extent::Box(r, c) => Extent::Box(c, r),
            len => len,
        };
        Mat { ptr: self.ptr, rs: self.cs, cs: self.rs, extent, _data: PhantomData }
    }

    /// The `rows x cols` matrix at `ptr` with strides `(rs, cs)`.
    ///
    /// # Safety
    /// For every `i < rows`, `j < cols`, `ptr + i·rs + j·cs` must address an initialised f32 that stays valid for
    /// reads, and that nothing writes, for `'a`.
    pub unsafe fn from_raw(ptr: *const f32, rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Mat { ptr, rs, cs, extent: Extent::Box(rows, cols), _data: PhantomData }
    }
}

/// The written operand: rows of a mutable slice at row stride `ld` (element `(i, j)` is `data[i·ld + j]`).
#[derive(Debug)]
pub struct MatMut<'a> {
    ptr: *mut f32,
    rs: usize,
    len: usize,
    _data: PhantomData<&'a mut [f32]>,
}

impl<'a> MatMut<'a> {
    pub fn rows(data: &'a mut [f32], ld: usize) -> Self {
        MatMut { ptr: data.as_mut_ptr(), rs: ld, len: data.len(), _data: PhantomData }
    }
}

/// One product: `dst (m x n) = [dst +] lhs (m x k) · rhs (k x n)`, `accumulate` choosing `+=` over `=`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub accumulate: bool,
}

impl Gemm {
    /// Runs the product. Panics when an operand does not hold the sizes it is used with (a kernel bug, never
    /// user data: the kernels size their buffers from validated shapes).
    #[inline]
    pub fn run(self, dst: MatMut, lhs: Mat, rhs: Mat) {
        let Gemm { m, n, k, accumulate } = self;
        assert!(
            covers(Extent::Len(dst.len), m, n, dst.rs, 1) && covers(lhs.extent, m, k, lhs.rs, lhs.cs)
                && covers(rhs.extent, k, n, rhs.rs, rhs.cs),
            "matmul: an operand is smaller than {m} x {k} · {k} x {n}"
        );
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                for i in 0..m {
                    // SAFETY: `dst` is a mutable slice borrowed for this call, and row `i < m` of `n` values at
                    // stride `rs` lies inside it (checked above).
                    unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.rs), n) }.fill(0.0);
                }
            }
            return;
        }
        // SAFETY: every element `gemm` reads or writes lies inside its operand (checked above): `dst` is a mutable
        // slice borrowed for this call, so no input (a shared slice, or view elements nothing writes, by
        // `Mat::from_raw`'s contract) overlaps it. Every stride fits in `isize` (checked with the sizes).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.ptr,
                1,
                dst.rs as isize,
                accumulate,
                lhs.ptr,
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.ptr,
                rhs.cs as isize,
                rhs.rs as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_transposes_and_sizes() {
        // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let mut c = [0.0f32; 4];
        let gemm = Gemm { m: 2, n: 2, k: 2, accumulate: false };
        gemm.run(MatMut::rows(&mut c, 2), Mat::rows(&a, 2), Mat::rows(&b, 2));
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        // + A · Bᵀ = [17 23; 39 53]
        Gemm { accumulate: true, ..gemm }.run(MatMut::rows(&mut c, 2), Mat::rows(&a, 2), Mat::rows(&b, 2).t());
        assert_eq!(c, [36.0, 45.0, 82.0, 103.0]);
        // k = 0 clears (or keeps) the destination.
        Gemm { k: 0, ..gemm }.run(MatMut::rows(&mut c, 2), Mat::rows(&[], 0), Mat::rows(&[], 2));
        assert_eq!(c, [0.0; 4]);
        // Operands too small for the sizes are refused before anything is read.
        let small = std::panic::catch_unwind(|| {
            let mut c = [0.0f32; 4];
            gemm.run(MatMut::rows(&mut c, 2), Mat::rows(&a[..3], 2), Mat::rows(&b, 2));
        });
        assert!(small.is_err());
        let boxed = std::panic::catch_unwind(|| {
            let mut c = [0.0f32; 4];
            // SAFETY: `a` holds the 1 x 2 elements the operand claims.
            let one_row = unsafe { Mat::from_raw(a.as_ptr(), 1, 2, 2, 1) };
            gemm.run(MatMut::rows(&mut c, 2), one_row, Mat::rows(&b, 2));
        });
        assert!(boxed.is_err());
    }
}
