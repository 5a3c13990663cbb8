//! The kernels' GEMM front: the `gemm` crate (which dispatches on CPU features at run time) over f32 matrices
//! with element strides. Element-wise math lives in `vmath`.

/// `dst (m x n) = [dst +] lhs (m x k) · rhs (k x n)`, all f32, strides in elements (row stride, column stride).
///
/// # Safety
/// Pointers must address matrices of the given sizes and strides; `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
#[inline]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_small() {
        // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let mut c = [0.0f32; 4];
        unsafe { matmul(2, 2, 2, c.as_mut_ptr(), 2, false, a.as_ptr(), 2, 1, b.as_ptr(), 2, 1) };
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        unsafe { matmul(2, 2, 2, c.as_mut_ptr(), 2, true, a.as_ptr(), 2, 1, b.as_ptr(), 1, 2) };
        // + A · Bᵀ = [17 23; 39 53]
        assert_eq!(c, [36.0, 45.0, 82.0, 103.0]);
    }
}
