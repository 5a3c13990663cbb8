//! The kernels' GEMM front: `dst = [dst +] lhs · rhs` over strided f32 matrices through the `gemm` crate's driver
//! and micro-kernels for the instruction set in use ([`Isa::current`]: AVX-512, AVX2+FMA or the baseline). Operands are made from slices, or from validated views
//! ([`crate::cpu::view::View::matrix`]), and remember what they may address, so a product is a safe call: [`Gemm::run`]
//! checks its sizes against every operand before `gemm` reads or writes anything. Element-wise math lives in
//! `vmath`.

use std::marker::PhantomData;

use super::isa::{Isa, Level};
use super::view::DType;

#[cfg(target_arch = "x86_64")]
mod bf16;

/// How a kernel call's attention products (`q·kᵀ`, `p·v` and their backward) run: f32 FMAs, or — for bf16 inputs
/// on the `Avx512Bf16` level — bf16 dot products with f32 accumulation, which round the operands that are not
/// inputs (probabilities, score gradients) to bf16 as a bf16 reference computation does. Made only from an
/// [`Isa`], so the bf16 products run only where the CPU has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    bf16: bool,
}

impl Precision {
    pub const F32: Precision = Precision { bf16: false };

    /// bf16 dot products for bf16 inputs on a level with them; f32 otherwise.
    pub fn for_inputs(dtype: DType, isa: Isa) -> Precision {
        Precision { bf16: cfg!(target_arch = "x86_64") && dtype == DType::BF16 && isa.level() >= Level::Avx512Bf16 }
    }

    pub fn is_bf16(self) -> bool {
        self.bf16
    }
}

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
    /// Runs the product on the level in use. Panics when an operand does not hold the sizes it is used with (a
    /// kernel bug, never user data: the kernels size their buffers from validated shapes).
    #[inline]
    pub fn run(self, dst: MatMut, lhs: Mat, rhs: Mat) {
        self.run_on(Isa::current(), dst, lhs, rhs)
    }

    /// [`Gemm::run`] in `precision`: bf16 dot products when it says so, f32 on the level in use otherwise.
    #[inline]
    pub fn run_in(self, precision: Precision, dst: MatMut, lhs: Mat, rhs: Mat) {
        if !precision.bf16 {
            return self.run(dst, lhs, rhs);
        }
        self.check(&dst, &lhs, &rhs);
        let Gemm { m, n, k, accumulate } = self;
        if m == 0 || n == 0 {
            return;
        }
        // SAFETY: `dst` was made from a mutable slice of `len` values borrowed for this call.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr, dst.len) };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a bf16 precision is made only from an `Isa` of the `Avx512Bf16` level, whose features (AVX-512 F,
        // BW and BF16) this CPU has; every element of `lhs` (m x k) and `rhs` (k x n) lies inside its operand
        // (checked above), and `out` holds the m rows of n values at stride `rs` (checked as well).
        unsafe {
            bf16::gemm(m, n, k, out, dst.rs, accumulate, &lhs, &rhs)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 products exist only on x86-64: {out:p}");
    }

    /// Panics unless every operand holds the sizes it is used with.
    fn check(self, dst: &MatMut, lhs: &Mat, rhs: &Mat) {
        let Gemm { m, n, k, .. } = self;
        assert!(
            covers(Extent::Len(dst.len), m, n, dst.rs, 1) && covers(lhs.extent, m, k, lhs.rs, lhs.cs)
                && covers(rhs.extent, k, n, rhs.rs, rhs.cs),
            "matmul: an operand is smaller than {m} x {k} · {k} x {n}"
        );
    }

    /// [`Gemm::run`] on the micro-kernels of `isa`.
    pub fn run_on(self, isa: Isa, dst: MatMut, lhs: Mat, rhs: Mat) {
        self.check(&dst, &lhs, &rhs);
        let Gemm { m, n, k, accumulate } = self;
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
        unsafe { gemm_f32(isa, (m, n, k), (dst.ptr, 1, dst.rs as isize), accumulate, lhs, rhs) };
    }
}

/// `dst (m x n, strides (cs, rs)) = [dst +] lhs · rhs` through the `gemm` crate's f32 driver and the micro-kernels
/// of `isa`'s level (its own dispatch would pick the best level once per process, so a forced lower level
/// would not reach the GEMMs). Like `gemm::gemm`, a row-major destination is computed as its transpose
/// (`dstᵀ = rhsᵀ · lhsᵀ`): the micro-kernels write column-major tiles.
///
/// # Safety
/// Every element of the three operands at the given sizes and strides must be addressable (reads; writes for
/// `dst`), `dst` must not overlap an input, and every stride must fit in `isize`.
unsafe fn gemm_f32(isa: Isa, (m, n, k): (usize, usize, usize), dst: (*mut f32, isize, isize), accumulate: bool, lhs: Mat, rhs: Mat) {
    let (dst, dst_cs, dst_rs) = dst;
    let (lhs_cs, lhs_rs, rhs_cs, rhs_rs) = (lhs.cs as isize, lhs.rs as isize, rhs.cs as isize, rhs.rs as isize);
    let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if dst_cs < dst_rs {
        (n, m, dst_rs, dst_cs, rhs.ptr, rhs_rs, rhs_cs, lhs.ptr, lhs_rs, lhs_cs)
    } else {
        (m, n, dst_cs, dst_rs, lhs.ptr, lhs_cs, lhs_rs, rhs.ptr, rhs_cs, rhs_rs)
    };
    macro_rules! run {
        ($simd:expr, $ukr:ident, $lanes:literal) => {{
            use gemm_f32::microkernel::$ukr::f32 as ukr;
            // SAFETY: the operands are as this function's contract says; `$simd` was made for a level this CPU
            // runs, whose micro-kernels take `$lanes` f32 per vector.
            unsafe {
                gemm_common::gemm::gemm_basic_generic::<_, f32, $lanes, { ukr::MR_DIV_N * $lanes }, { ukr::NR }, { ukr::MR_DIV_N }, { ukr::H_M }, { ukr::H_N }>(
                    $simd, m, n, k, dst, dst_cs, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
                    1.0, 1.0, false, false, false, |a, b, c| a * b + c, &ukr::UKR, &ukr::H_UKR, false,
                    gemm_common::Parallelism::None,
                )
            }
        }};
    }
    #[cfg(target_arch = "x86_64")]
    {
        use gemm_common::simd::{MixedSimd, V3, V4};
        if isa.level() >= Level::Avx512 {
            let simd = <V4 as MixedSimd<f32, f32, f32, f32>>::try_new().expect("an Isa's level is one this CPU runs");
            return run!(simd, avx512f, 16);
        }
        if isa.level() >= Level::Avx2 {
            let simd = <V3 as MixedSimd<f32, f32, f32, f32>>::try_new().expect("an Isa's level is one this CPU runs");
            return run!(simd, fma, 8);
        }
    }
    run!(gemm_common::simd::Scalar, scalar, 1)
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

    #[test]
    fn bf16_products_match_a_naive_product_of_the_rounded_operands() {
        let Ok(isa) = Isa::new(Level::Avx512Bf16) else {
            eprintln!("skipped: this CPU lacks avx512bf16");
            return;
        };
        let bf16 = Precision::for_inputs(DType::BF16, isa);
        assert!(bf16.is_bf16() && !Precision::for_inputs(DType::F32, isa).is_bf16());
        let round = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        // Tails of the 8 x 32 tile and of the 16-wide packing, odd inner sizes, both operand orientations; the
        // tests' packed blocks (16 rows, 64 columns, 16 inner values) are crossed in every dimension.
        for &(m, n, k) in &[(1, 1, 1), (8, 32, 2), (9, 33, 3), (17, 47, 33), (64, 256, 64), (40, 16, 63), (3, 70, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.0937).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1171).collect();
            for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
                let lhs = if at { Mat::rows(&a, m).t() } else { Mat::rows(&a, k) };
                let rhs = if bt { Mat::rows(&b, k).t() } else { Mat::rows(&b, n) };
                for accumulate in [false, true] {
                    let ld = n + 3;
                    let mut c = vec![0.5f32; m * ld];
                    Gemm { m, n, k, accumulate }.run_in(bf16, MatMut::rows(&mut c, ld), lhs, rhs);
                    for i in 0..m {
                        for j in 0..n {
                            let mut want = if accumulate { 0.5 } else { 0.0 };
                            for p in 0..k {
                                let x = if at { a[p * m + i] } else { a[i * k + p] };
                                let y = if bt { b[j * k + p] } else { b[p * n + j] };
                                want += round(x) * round(y);
                            }
                            let got = c[i * ld + j] as f64;
                            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{m}x{n}x{k} {at} {bt}: {got} vs {want}");
                        }
                        assert!(c[i * ld + n..(i + 1) * ld].iter().all(|&x| x == 0.5), "a padding column was written");
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_matches_a_naive_product() {
        // Sizes around the micro-kernels' tiles (up to 64 x 6 with AVX-512), both operand orders, and both
        // destination orientations (a destination row stride below its width is not possible: rows of `ld`).
        let naive = |m: usize, n: usize, k: usize, a: &[f32], at: bool, b: &[f32], bt: bool| -> Vec<f64> {
            let mut c = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    for p in 0..k {
                        let x = if at { a[p * m + i] } else { a[i * k + p] };
                        let y = if bt { b[j * k + p] } else { b[p * n + j] };
                        c[i * n + j] += x as f64 * y as f64;
                    }
                }
            }
            c
        };
        for isa in Isa::supported() {
            for &(m, n, k) in &[(1, 1, 1), (3, 70, 5), (67, 13, 64), (64, 256, 64), (130, 7, 33), (5, 1, 9)] {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1).collect();
                for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
                    let lhs = if at { Mat::rows(&a, m).t() } else { Mat::rows(&a, k) };
                    let rhs = if bt { Mat::rows(&b, k).t() } else { Mat::rows(&b, n) };
                    let want = naive(m, n, k, &a, at, &b, bt);
                    let mut c = vec![1.0f32; m * n];
                    Gemm { m, n, k, accumulate: true }.run_on(isa, MatMut::rows(&mut c, n), lhs, rhs);
                    for (got, want) in c.iter().zip(&want) {
                        let want = want + 1.0;
                        assert!((*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{isa:?} {m}x{n}x{k}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
