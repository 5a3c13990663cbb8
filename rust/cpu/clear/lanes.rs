//! The three small products of the disc kernels, with the 16 queries of a tile in 16 lanes (two AVX2 vectors).
//! Generic over `FMA` and `#[inline(always)]`: the tile functions that call them are compiled once for AVX2+FMA
//! and once for the baseline (`vmath`'s scheme), and each `[f32; 16]` becomes two vector registers.
//!
//! - [`dots`]: logits `s[j] = Σ_c a[c]·panel[c][j]` of the lanes against keys stored as a transposed panel
//!   (a register block of 6 keys: two vector loads and 6 broadcasts per channel for 12 FMAs, the shape of a
//!   GEMM microkernel; with 8 lanes the broadcasts, one per FMA, ran this CPU at about half the rate).
//! - [`combine`]: `acc[c] += Σ_j w[j]·rows[j][c]` (P·V, dS·K) over row-major keys, 6 channels per block.
//! - [`update`]: `dst[j][c] += Σ_l w[j][l]·b[l][c]` (the key gradients), 3 keys × 32 channels per block.

use crate::cpu::vmath::{exp2_one, madd};

pub const LANES: usize = 16;
/// One value per query of a tile (two AVX2 vectors).
pub type Lanes = [f32; LANES];

#[inline(always)]
fn fma_lanes<const FMA: bool>(a: f32, b: &Lanes, acc: &mut Lanes) {
    for l in 0..LANES {
        acc[l] = madd::<FMA>(a, b[l], acc[l]);
    }
}

/// Keys [`dots`] may compute past `n`.
pub const DOTS_OVERRUN: usize = 1;

/// `out[j] = Σ_c a[c] · panel[c·stride + j]` for `j < n`, computed in blocks of 6, 4 or 2 keys: the tail block
/// may run [`DOTS_OVERRUN`] key past `n`, so `out` and the panel's columns must extend that far (checked by the
/// slicing). Blocks of a single key would be bound by the FMA latency, not its throughput.
#[inline(always)]
pub fn dots<const FMA: bool>(a: &[Lanes], panel: &[f32], stride: usize, n: usize, out: &mut [Lanes]) {
    let mut j = 0;
    while j < n {
        let rest = n - j;
        if rest > 4 {
            dots_block::<FMA, 6>(a, &panel[j..], stride, &mut out[j..j + 6]);
            j += 6;
        } else if rest > 2 {
            dots_block::<FMA, 4>(a, &panel[j..], stride, &mut out[j..j + 4]);
            j += 4;
        } else {
            dots_block::<FMA, 2>(a, &panel[j..], stride, &mut out[j..j + 2]);
            j += 2;
        }
    }
}

#[inline(always)]
fn dots_block<const FMA: bool, const NB: usize>(a: &[Lanes], panel: &[f32], stride: usize, out: &mut [Lanes]) {
    let mut acc = [[0.0f32; LANES]; NB];
    for (c, av) in a.iter().enumerate() {
        let column = &panel[c * stride..][..NB];
        for i in 0..NB {
            fma_lanes::<FMA>(column[i], av, &mut acc[i]);
        }
    }
    out.copy_from_slice(&acc);
}

/// `acc[c] += Σ_j w[j] · rows[j·stride + c]` for `c < acc.len()`, `j < w.len()`.
#[inline(always)]
pub fn combine<const FMA: bool>(w: &[Lanes], rows: &[f32], stride: usize, acc: &mut [Lanes]) {
    let n = acc.len();
    let mut c = 0;
    while c + 6 <= n {
        combine_block::<FMA, 6>(w, &rows[c..], stride, &mut acc[c..c + 6]);
        c += 6;
    }
    while c + 2 <= n {
        combine_block::<FMA, 2>(w, &rows[c..], stride, &mut acc[c..c + 2]);
        c += 2;
    }
    while c < n {
        combine_block::<FMA, 1>(w, &rows[c..], stride, &mut acc[c..c + 1]);
        c += 1;
    }
}

#[inline(always)]
fn combine_block<const FMA: bool, const CB: usize>(w: &[Lanes], rows: &[f32], stride: usize, acc: &mut [Lanes]) {
    let mut a = [[0.0f32; LANES]; CB];
    a.copy_from_slice(acc);
    for (j, wv) in w.iter().enumerate() {
        let row = &rows[j * stride..][..CB];
        for i in 0..CB {
            fma_lanes::<FMA>(row[i], wv, &mut a[i]);
        }
    }
    acc.copy_from_slice(&a);
}

/// Channels per vector of [`update`]: its rows must be padded to a multiple of this.
pub const COLS: usize = 8;
type Cols = [f32; COLS];

#[inline(always)]
fn fma_cols<const FMA: bool>(a: f32, b: &Cols, acc: &mut Cols) {
    for i in 0..COLS {
        acc[i] = madd::<FMA>(a, b[i], acc[i]);
    }
}

/// `dst[j·stride + c] += Σ_l w[j][l] · b[l·width + c]` for `j < w.len()`, `c < width`; `width` a multiple of
/// [`COLS`] (callers pad rows with zeros). Vectors run along the channels here: 3 keys × 4 vectors per block.
#[inline(always)]
pub fn update<const FMA: bool>(w: &[Lanes], b: &[f32], width: usize, dst: &mut [f32], stride: usize) {
    debug_assert!(width.is_multiple_of(COLS));
    let n = w.len();
    let mut j = 0;
    while j + 3 <= n {
        update_keys::<FMA, 3>(&w[j..j + 3], b, width, &mut dst[j * stride..], stride);
        j += 3;
    }
    while j < n {
        update_keys::<FMA, 1>(&w[j..j + 1], b, width, &mut dst[j * stride..], stride);
        j += 1;
    }
}

#[inline(always)]
fn update_keys<const FMA: bool, const JB: usize>(w: &[Lanes], b: &[f32], width: usize, dst: &mut [f32], stride: usize) {
    let mut c = 0;
    while c + 4 * COLS <= width {
        update_block::<FMA, JB, 4>(w, &b[c..], width, &mut dst[c..], stride);
        c += 4 * COLS;
    }
    while c < width {
        update_block::<FMA, JB, 1>(w, &b[c..], width, &mut dst[c..], stride);
        c += COLS;
    }
}

#[inline(always)]
fn update_block<const FMA: bool, const JB: usize, const VB: usize>(w: &[Lanes], b: &[f32], width: usize, dst: &mut [f32], stride: usize) {
    let mut acc = [[[0.0f32; COLS]; VB]; JB];
    for (jj, a) in acc.iter_mut().enumerate() {
        for (v, av) in a.iter_mut().enumerate() {
            av.copy_from_slice(&dst[jj * stride + v * COLS..][..COLS]);
        }
    }
    for l in 0..LANES {
        let row = &b[l * width..][..VB * COLS];
        for v in 0..VB {
            let mut bv = [0.0f32; COLS];
            bv.copy_from_slice(&row[v * COLS..(v + 1) * COLS]);
            for jj in 0..JB {
                fma_cols::<FMA>(w[jj][l], &bv, &mut acc[jj][v]);
            }
        }
    }
    for (jj, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            dst[jj * stride + v * COLS..][..COLS].copy_from_slice(av);
        }
    }
}

/// Sets `s[i][l] = −∞` where key column `x0 + i` is outside lane `l`'s interval `[lo[l], hi[l]]` (empty when
/// `lo > hi`).
#[inline(always)]
pub fn mask_columns(s: &mut [Lanes], x0: f32, lo: &Lanes, hi: &Lanes) {
    for (i, row) in s.iter_mut().enumerate() {
        let x = x0 + i as f32;
        for l in 0..LANES {
            row[l] = if x >= lo[l] && x <= hi[l] { row[l] } else { f32::NEG_INFINITY };
        }
    }
}

/// Lane-wise maximum of `s` (−∞ when empty).
#[inline(always)]
pub fn max_lanes(s: &[Lanes]) -> Lanes {
    let mut m = [f32::NEG_INFINITY; LANES];
    for row in s {
        for l in 0..LANES {
            m[l] = if row[l] > m[l] { row[l] } else { m[l] };
        }
    }
    m
}

/// `s[j] = 2^(s[j] − shift)` in place; returns the lane-wise sums.
#[inline(always)]
pub fn exp2_shift<const FMA: bool>(s: &mut [Lanes], shift: &Lanes) -> Lanes {
    let mut sum = [0.0f32; LANES];
    for row in s.iter_mut() {
        for l in 0..LANES {
            row[l] = exp2_one::<FMA>(row[l] - shift[l]);
            sum[l] += row[l];
        }
    }
    sum
}
