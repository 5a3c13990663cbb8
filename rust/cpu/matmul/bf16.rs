//! The bf16 dot-product GEMM of the `Avx512Bf16` level: `dst = [dst +] lhs · rhs` with both operands rounded to
//! bf16 (round to nearest even, as `vcvtne2ps2bf16` does) and products summed in f32 by `vdpbf16ps`, which adds
//! two products per f32 lane and so does twice the work of an f32 FMA per instruction.
//!
//! `vdpbf16ps` multiplies pairs of bf16 along the inner dimension, so both operands are packed as 32-bit pairs
//! `(x[2p], x[2p+1])` (an odd inner size gets a zero in its last pair): `lhs` row-major (`m` rows of `kp = ⌈k/2⌉`
//! pairs, rows padded with zeros to a multiple of [`MR`]) and `rhs` in panels of [`NR`] columns (`kp` pairs of a
//! panel's columns, columns padded with zeros to a multiple of `NR`). The micro-kernel keeps an `MR x NR` tile in
//! 16 registers: per pair, two loads of `rhs` and `MR` broadcasts of `lhs`. The packing reads whole vectors where
//! an operand's pairs or its columns are contiguous (the layouts of the attention kernels' buffers), element by
//! element otherwise. Packed operands live in per-thread buffers reused across calls.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::Mat;

/// Rows of the micro-kernel's tile.
const MR: usize = 8;
/// Columns of the micro-kernel's tile (two vectors of 16 f32).
const NR: usize = 32;

thread_local! {
    /// The packed `lhs` and `rhs` of the running product on this thread.
    static PACKED: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

/// A pair packed for `vdpbf16ps`: `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// Element `(i, j)` of `x`.
///
/// # Safety
/// `(i, j)` must lie inside the sizes the operand is used with (which `Gemm::run_on` checked against its extent).
#[inline(always)]
unsafe fn at(x: &Mat, i: usize, j: usize) -> f32 {
    // SAFETY: by this function's contract.
    unsafe { *x.ptr.add(i * x.rs + j * x.cs) }
}

/// The pair of elements `(i, 2q)`, `(i, 2q + 1)` of `x` (`k` columns; 0 past them), or of `xᵀ` when `transposed`.
///
/// # Safety
/// Both elements, where below `k`, must lie inside the sizes the operand is used with.
#[inline(always)]
unsafe fn pair_at(x: &Mat, i: usize, q: usize, k: usize, transposed: bool) -> u32 {
    let get = |c: usize| {
        if c >= k {
            0.0
        } else if transposed {
            // SAFETY: by this function's contract.
            unsafe { at(x, c, i) }
        } else {
            // SAFETY: by this function's contract.
            unsafe { at(x, i, c) }
        }
    };
    pair(get(2 * q), get(2 * q + 1))
}

/// `x[i..i + 16]` along the operand's unit stride from element `(i0, j0)`: 16 consecutive f32 in memory.
///
/// # Safety
/// The 16 elements from offset `i0·rs + j0·cs` must lie inside the operand.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load16(x: &Mat, i0: usize, j0: usize) -> __m512 {
    // SAFETY: by this function's contract.
    unsafe { _mm512_loadu_ps(x.ptr.add(i0 * x.rs + j0 * x.cs)) }
}

/// 16 pairs `(a[l], b[l])` of two vectors of 16 f32, rounded to bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn interleave(a: __m512, b: __m512) -> __m512i {
    let (a, b) = (_mm512_cvtneps_pbh(a), _mm512_cvtneps_pbh(b));
    // SAFETY: `__m256bh` and `__m256i` are 32 plain bytes, any bit pattern valid in both.
    let (a, b): (__m256i, __m256i) = unsafe { (std::mem::transmute(a), std::mem::transmute(b)) };
    _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)))
}

/// 32 consecutive f32 `(a, b)` as their 16 consecutive pairs, rounded to bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn consecutive_pairs(a: __m512, b: __m512) -> __m512i {
    // SAFETY: `__m512bh` and `__m512i` are 64 plain bytes, any bit pattern valid in both.
    unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(b, a)) }
}

/// Packs `lhs` (`m x k`) as rows of `kp` pairs into `out` (`⌈m/MR⌉·MR` rows, the padding zero).
///
/// # Safety
/// Every element of `lhs` inside `m x k` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lhs(lhs: &Mat, m: usize, k: usize, out: &mut Vec<u32>) {
    let kp = k.div_ceil(2);
    out.clear();
    out.resize(m.div_ceil(MR) * MR * kp, 0);
    let full = k / 2;
    if lhs.cs == 1 {
        // Pairs lie along the rows: 16 pairs from 32 consecutive values.
        for i in 0..m {
            let row = &mut out[i * kp..(i + 1) * kp];
            let mut p = 0;
            while p + 16 <= full {
                // SAFETY: elements (i, 2p .. 2p + 32) lie inside the operand (2p + 32 <= k).
                let v = unsafe { consecutive_pairs(load16(lhs, i, 2 * p), load16(lhs, i, 2 * p + 16)) };
                // SAFETY: `row` holds `kp >= p + 16` values, so the 16 from `p` are inside it.
                unsafe { _mm512_storeu_si512(row.as_mut_ptr().add(p).cast(), v) };
                p += 16;
            }
            for (q, x) in row.iter_mut().enumerate().skip(p) {
                // SAFETY: row i < m; the pair's columns below k (this function's contract).
                *x = unsafe { pair_at(lhs, i, q, k, false) };
            }
        }
        return;
    }
    let mut i = 0;
    if lhs.rs == 1 {
        // Columns are contiguous: 16 rows of one pair from two columns.
        while i + 16 <= m {
            for p in 0..full {
                // SAFETY: elements (i .. i + 16, 2p) and (…, 2p + 1) lie inside the operand (i + 16 <= m, 2p + 1 < k).
                let v = unsafe { interleave(load16(lhs, i, 2 * p), load16(lhs, i, 2 * p + 1)) };
                let mut lanes = [0u32; 16];
                // SAFETY: `lanes` holds 16 u32.
                unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), v) };
                for (r, x) in lanes.into_iter().enumerate() {
                    out[(i + r) * kp + p] = x;
                }
            }
            if full < kp {
                for r in i..i + 16 {
                    // SAFETY: row r < m; the pair's columns below k.
                    out[r * kp + full] = unsafe { pair_at(lhs, r, full, k, false) };
                }
            }
            i += 16;
        }
    }
    for r in i..m {
        for q in 0..kp {
            // SAFETY: row r < m; the pair's columns below k.
            out[r * kp + q] = unsafe { pair_at(lhs, r, q, k, false) };
        }
    }
}

/// Packs `rhs` (`k x n`) in panels of `NR` columns (`kp` pairs each, the padding zero) into `out`.
///
/// # Safety
/// Every element of `rhs` inside `k x n` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs(rhs: &Mat, k: usize, n: usize, out: &mut Vec<u32>) {
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    out.clear();
    out.resize(panels * kp * NR, 0);
    let full = k / 2;
    let slot = |p: usize, j: usize| ((j / NR) * kp + p) * NR + j % NR;
    if rhs.cs == 1 {
        // Rows are contiguous: 16 columns of one pair from two rows, stored as they are.
        let mut j = 0;
        while j + 16 <= n {
            for p in 0..full {
                // SAFETY: elements (2p, j .. j + 16) and (2p + 1, …) lie inside the operand.
                let v = unsafe { interleave(load16(rhs, 2 * p, j), load16(rhs, 2 * p + 1, j)) };
                let at = slot(p, j);
                let dst = &mut out[at..at + 16];
                // SAFETY: `dst` holds 16 u32.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) };
            }
            if full < kp {
                for c in j..j + 16 {
                    // SAFETY: column c < n; the pair's rows below k (this function's contract).
                    out[slot(full, c)] = unsafe { pair_at(rhs, c, full, k, true) };
                }
            }
            j += 16;
        }
        for c in j..n {
            for q in 0..kp {
                // SAFETY: column c < n; the pair's rows below k.
                out[slot(q, c)] = unsafe { pair_at(rhs, c, q, k, true) };
            }
        }
        return;
    }
    for c in 0..n {
        let mut p = 0;
        if rhs.rs == 1 {
            // Pairs lie along the columns: 16 pairs from 32 consecutive values.
            while p + 16 <= full {
                // SAFETY: elements (2p .. 2p + 32, c) lie inside the operand.
                let v = unsafe { consecutive_pairs(load16(rhs, 2 * p, c), load16(rhs, 2 * p + 16, c)) };
                let mut lanes = [0u32; 16];
                // SAFETY: `lanes` holds 16 u32.
                unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), v) };
                for (q, x) in lanes.into_iter().enumerate() {
                    out[slot(p + q, c)] = x;
                }
                p += 16;
            }
        }
        for q in p..kp {
            // SAFETY: column c < n; the pair's rows below k.
            out[slot(q, c)] = unsafe { pair_at(rhs, c, q, k, true) };
        }
    }
}

/// The `MR x NR` tile `a · b` of `MR` packed rows (`a`, `kp` pairs each) and one packed panel (`b`).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn tile(a: &[u32], b: &[u32], kp: usize) -> [[f32; NR]; MR] {
    let rows: [&[u32]; MR] = std::array::from_fn(|r| &a[r * kp..(r + 1) * kp]);
    let b = &b[..kp * NR];
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let cols = &b[p * NR..(p + 1) * NR];
        // SAFETY: `cols` holds NR = 32 u32, two vectors of 16; `__m512i` and `__m512bh` are 64 plain bytes.
        let (b0, b1): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute(_mm512_loadu_si512(cols.as_ptr().cast())),
                std::mem::transmute(_mm512_loadu_si512(cols.as_ptr().add(16).cast())),
            )
        };
        for (row, acc) in rows.iter().zip(acc.iter_mut()) {
            // SAFETY: `__m512i` and `__m512bh` are 64 plain bytes, any bit pattern valid in both.
            let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(row[p] as i32)) };
            acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
        }
    }
    let mut out = [[0.0f32; NR]; MR];
    for (o, a) in out.iter_mut().zip(&acc) {
        // SAFETY: `o` holds NR = 32 f32, two vectors of 16.
        unsafe {
            _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
        }
    }
    out
}

// The operands are packed in blocks of at most `MC x 2·KC` and `2·KC x NC` values (at most 4 MiB and 8 MiB), so
// the packing buffers are bounded whatever a call's sizes; the kernels' products fit in one block. The unit tests
// use small blocks, so their sizes cross every block boundary.
/// Pairs of the inner dimension packed at a time.
const KC: usize = if cfg!(test) { 8 } else { 2048 };
/// Rows of `lhs` packed at a time (a multiple of `MR`).
const MC: usize = if cfg!(test) { 16 } else { 512 };
/// Columns of `rhs` packed at a time (a multiple of `NR`).
const NC: usize = if cfg!(test) { 64 } else { 1024 };

/// `x` from element `(i, j)` on: the same strides, its origin moved (the extent is kept: nothing past
/// `Gemm::run_in`'s check reads it).
///
/// # Safety
/// `(i, j)` must lie inside the sizes the operand is used with.
unsafe fn from<'a>(x: &Mat<'a>, i: usize, j: usize) -> Mat<'a> {
    // SAFETY: by this function's contract the offset stays inside the operand.
    let ptr = unsafe { x.ptr.add(i * x.rs + j * x.cs) };
    Mat { ptr, rs: x.rs, cs: x.cs, extent: x.extent, _data: std::marker::PhantomData }
}

/// `dst (m x n, row stride ld) = [dst +] lhs · rhs` in bf16 dot products, block by block of the operands (each
/// block of the inner dimension after the first accumulates).
///
/// # Safety
/// Every element of `lhs` inside `m x k` and of `rhs` inside `k x n` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], ld: usize, accumulate: bool, lhs: &Mat, rhs: &Mat) {
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * ld..][..n].fill(0.0));
        }
        return;
    }
    PACKED.with_borrow_mut(|(a, b)| {
        for k0 in (0..k).step_by(2 * KC) {
            let kc = (2 * KC).min(k - k0);
            let kp = kc.div_ceil(2);
            let add = accumulate || k0 > 0;
            for j0 in (0..n).step_by(NC) {
                let nc = NC.min(n - j0);
                // SAFETY: (k0, j0) lies inside `rhs` (k0 < k, j0 < n), and so does its `kc x nc` block.
                unsafe { pack_rhs(&from(rhs, k0, j0), kc, nc, b) };
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    // SAFETY: (i0, k0) lies inside `lhs` (i0 < m, k0 < k), and so does its `mc x kc` block.
                    unsafe { pack_lhs(&from(lhs, i0, k0), mc, kc, a) };
                    for r0 in (0..mc).step_by(MR) {
                        let rows = MR.min(mc - r0);
                        for (jb, c0) in (0..nc).step_by(NR).enumerate() {
                            let cols = NR.min(nc - c0);
                            let t = tile(&a[r0 * kp..(r0 + MR) * kp], &b[jb * kp * NR..(jb + 1) * kp * NR], kp);
                            for (r, tr) in t.iter().enumerate().take(rows) {
                                let out = &mut dst[(i0 + r0 + r) * ld + j0 + c0..][..cols];
                                if add {
                                    out.iter_mut().zip(tr).for_each(|(o, x)| *o += x);
                                } else {
                                    out.copy_from_slice(&tr[..cols]);
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}
