//! The small attention products of 16 queries held in the 16 lanes of a vector (one AVX-512 vector, two AVX2
//! vectors), against keys read as rows in place: CLEAR's disc tiles and LLSA's fine blocks. Generic over `FMA` and
//! the vector width `W` and `#[inline(always)]`: the tile functions that
//! call them are compiled for each instruction set (`isa_dispatch!`), and each `[f32; 16]` becomes one or two
//! vector registers; `W` picks register blocks that fill the register file (32 vectors with AVX-512, 16 with AVX2).
//! With 16-lane vectors (`W = 16`, the AVX-512 clone) each function runs its clone in `zmm`, written with explicit
//! `__m512` vectors: left to the vectorizer, that clone's lane loops became gathers and scatters.
//!
//! - [`dots`]: logits `s[j] = Σ_c a[c]·keys[j][c]` of the lanes against row-major keys (a register block of 12
//!   or 6 keys: one or two vector loads per channel and a broadcast per key and channel).
//! - [`combine`]: `acc[c] += Σ_j w[j]·rows[j][c]` (P·V, dS·K) over row-major keys, 8 or 6 channels per block.
//! - [`update`]: `dst[j][c] += Σ_l w[j][l]·b[l][c]` (the key gradients), 3 keys × 4 vectors per block.

use crate::cpu::vmath::{exp2_one, madd};

#[cfg(target_arch = "x86_64")]
mod zmm;

pub const LANES: usize = 16;
/// One value per query of a tile (two AVX2 vectors).
pub type Lanes = [f32; LANES];

#[inline(always)]
fn fma_lanes<const FMA: bool>(a: f32, b: &Lanes, acc: &mut Lanes) {
    for l in 0..LANES {
        acc[l] = madd::<FMA>(a, b[l], acc[l]);
    }
}

/// `out[j] = Σ_c a[c] · keys[j·stride + c]` for `j < n` (keys stored as rows of `stride` values), computed in
/// register blocks of keys (12, 8, 4, 2 or 1 with 16-lane vectors, where one vector holds a key's 16 logits; 6, 4,
/// 2 or 1 with 8-lane ones, two vectors a key): per channel one load of `a[c]` and a broadcast per key, the shape
/// of a GEMM microkernel (with 8 lanes the broadcasts, one per FMA, ran the AVX2 test CPU at about half the rate).
/// Blocks of 1 or 2 keys finish a segment, with split accumulators ([`dot_chains`]).
#[inline(always)]
pub fn dots<const FMA: bool, const W: usize>(a: &[Lanes], keys: &[f32], stride: usize, n: usize, out: &mut [Lanes]) {
    let mut j = 0;
    while j < n {
        let rest = n - j;
        let block = if W >= LANES {
            [12, 8, 4, 2, 1][usize::from(rest < 12) + usize::from(rest < 8) + usize::from(rest < 4) + usize::from(rest < 2)]
        } else {
            [6, 4, 2, 1][usize::from(rest < 6) + usize::from(rest < 4) + usize::from(rest < 2)]
        };
        let keys = &keys[j * stride..];
        match block {
            12 => dots_block::<FMA, W, 12>(a, keys, stride, &mut out[j..j + 12]),
            8 => dots_block::<FMA, W, 8>(a, keys, stride, &mut out[j..j + 8]),
            6 => dots_block::<FMA, W, 6>(a, keys, stride, &mut out[j..j + 6]),
            4 => dots_block::<FMA, W, 4>(a, keys, stride, &mut out[j..j + 4]),
            2 => dots_block::<FMA, W, 2>(a, keys, stride, &mut out[j..j + 2]),
            _ => dots_block::<FMA, W, 1>(a, keys, stride, &mut out[j..j + 1]),
        }
        j += block;
    }
}

/// `out[i] = Σ_c a[c] · keys[i·stride + c]` for `i < NB`.
#[inline(always)]
fn dots_block<const FMA: bool, const W: usize, const NB: usize>(
    a: &[Lanes],
    keys: &[f32],
    stride: usize,
    out: &mut [Lanes],
) {
    let rows: [&[f32]; NB] = std::array::from_fn(|i| &keys[i * stride..][..a.len()]);
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::dots_block::<NB>(a, rows, out) };
    }
    let chains = dot_chains(NB);
    let mut acc = [[[0.0f32; LANES]; 4]; NB];
    for (c, av) in a.iter().enumerate() {
        for i in 0..NB {
            fma_lanes::<FMA>(rows[i][c], av, &mut acc[i][c % chains]);
        }
    }
    for (o, parts) in out[..NB].iter_mut().zip(&acc) {
        let sum = |x: &Lanes, y: &Lanes| -> Lanes { std::array::from_fn(|l| x[l] + y[l]) };
        *o = match chains {
            1 => parts[0],
            2 => sum(&parts[0], &parts[1]),
            _ => sum(&sum(&parts[0], &parts[1]), &sum(&parts[2], &parts[3])),
        };
    }
}

/// Accumulator chains per key in a [`dots`] block of `nb` keys: blocks of fewer than 4 keys split the channels
/// (channel `c` into chain `c % chains`, summed at the end as `(c0 + c1) + (c2 + c3)`) so that 4 independent
/// FMA chains hide the FMA latency (a single chain ran a key's 64 channels at a quarter of the FMA rate).
pub const fn dot_chains(nb: usize) -> usize {
    if nb >= 4 {
        1
    } else {
        4 / nb
    }
}

/// `out[c][l] = rows[l·stride + c]·mul` for `c < out.len()` and `l < live` (`live ≤ 16` rows of at least
/// `out.len()` values), lanes `l ≥ live` set to 0: 16 rows of a matrix into the lanes layout (16×16 transposes in
/// registers with 16-lane vectors).
#[inline(always)]
pub fn rows_to_lanes<const W: usize>(rows: &[f32], stride: usize, live: usize, mul: f32, out: &mut [Lanes]) {
    assert!(live <= LANES && (live == 0 || rows.len() >= (live - 1) * stride + out.len()));
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::rows_to_lanes(rows, stride, live, mul, out) };
    }
    for (c, lanes) in out.iter_mut().enumerate() {
        for (l, x) in lanes.iter_mut().enumerate() {
            *x = if l < live { rows[l * stride + c] * mul } else { 0.0 };
        }
    }
}

/// `rows[l·stride + c] = lanes[c][l]·by[l]` for `c < lanes.len()` and `l < live`: the lanes layout back into
/// `live ≤ 16` rows, each scaled by its own factor.
#[inline(always)]
pub fn lanes_to_rows<const W: usize>(lanes: &[Lanes], by: &Lanes, live: usize, rows: &mut [f32], stride: usize) {
    assert!(live <= LANES && (live == 0 || rows.len() >= (live - 1) * stride + lanes.len()));
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: as in `rows_to_lanes`: the AVX-512 clone runs only where the CPU has AVX-512 F.
        return unsafe { zmm::lanes_to_rows(lanes, by, live, rows, stride) };
    }
    for l in 0..live {
        for (c, x) in lanes.iter().enumerate() {
            rows[l * stride + c] = x[l] * by[l];
        }
    }
}

/// Channel pairs of the 16 lanes for bf16 dot products: lane `l` holds `(x[l][2p], x[l][2p + 1])` as bf16 bits,
/// the first in the low half.
pub type PairLanes = [u32; LANES];

/// `out[p][l]` = the pair `(a[2p][l], a[2p + 1][l])` as bf16 bits (`a` holds values exact in bf16: the bits are
/// the high halves of theirs).
pub fn pair_lanes(a: &[Lanes], out: &mut [PairLanes]) {
    for (o, pair) in out.iter_mut().zip(a.chunks_exact(2)) {
        for l in 0..LANES {
            o[l] = (pair[0][l].to_bits() >> 16) | (pair[1][l].to_bits() & 0xffff_0000);
        }
    }
}

/// [`dots`] with bf16 dot products: `out[j] = Σ_p a[p]·(keys[j·stride + 2p], keys[j·stride + 2p + 1])` for `j < n`,
/// keys as bf16 bits in rows of `stride` values (`2·a.len()` of them used), products exact and summed in f32 by
/// `vdpbf16ps` (two per f32 lane and instruction: twice the work of an f32 FMA). Register blocks as [`dots`]'.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn dots_bf16(a: &[PairLanes], keys: &[u16], stride: usize, n: usize, out: &mut [Lanes]) {
    let width = 2 * a.len();
    let mut j = 0;
    while j < n {
        let rest = n - j;
        let keys = &keys[j * stride..];
        let out = &mut out[j..];
        let rows = |i: usize| &keys[i * stride..][..width];
        // SAFETY: the CPU has the features (this function's contract).
        let block = unsafe {
            if rest >= 12 {
                zmm::dots_bf16_block::<12>(a, std::array::from_fn(rows), out);
                12
            } else if rest >= 8 {
                zmm::dots_bf16_block::<8>(a, std::array::from_fn(rows), out);
                8
            } else if rest >= 4 {
                zmm::dots_bf16_block::<4>(a, std::array::from_fn(rows), out);
                4
            } else if rest >= 2 {
                zmm::dots_bf16_block::<2>(a, std::array::from_fn(rows), out);
                2
            } else {
                zmm::dots_bf16_block::<1>(a, std::array::from_fn(rows), out);
                1
            }
        };
        j += block;
    }
}

/// The rows `w[j]` (weights of keys `first + j`) as bf16 pairs of keys aligned to even key indices, for
/// [`combine_bf16`]: `out[m]` pairs keys `2(first/2 + m)` and `2(first/2 + m) + 1`, a key outside `w` weighing 0.
/// Returns the number of pairs.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn pair_key_lanes(w: &[Lanes], first: usize, out: &mut [PairLanes]) -> usize {
    const ZERO: Lanes = [0.0; LANES];
    let lead = first % 2;
    let pairs = (lead + w.len()).div_ceil(2);
    let at = |i: usize| if i >= lead && i - lead < w.len() { &w[i - lead] } else { &ZERO };
    for (m, o) in out[..pairs].iter_mut().enumerate() {
        // SAFETY: the CPU has the features (this function's contract).
        unsafe { zmm::bf16_pair(at(2 * m), at(2 * m + 1), o) };
    }
    pairs
}

/// `acc[c] += Σ_m dot2(w[m], pairs[m·stride + c])` for `c < acc.len()`: P·V in bf16 dot products, with `w` from
/// [`pair_key_lanes`] and `pairs` the keys' rows paired the same way (8 channels per register block).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn combine_bf16(w: &[PairLanes], pairs: &[u32], stride: usize, acc: &mut [Lanes]) {
    let n = acc.len();
    let mut c = 0;
    while c < n {
        let block = if n - c >= 8 { 8 } else if n - c >= 2 { 2 } else { 1 };
        let (pairs, acc) = (&pairs[c..], &mut acc[c..c + block]);
        // SAFETY: the CPU has the features (this function's contract).
        unsafe {
            match block {
                8 => zmm::combine_bf16_block::<8>(w, pairs, stride, acc),
                2 => zmm::combine_bf16_block::<2>(w, pairs, stride, acc),
                _ => zmm::combine_bf16_block::<1>(w, pairs, stride, acc),
            }
        }
        c += block;
    }
}

/// `acc[c] += Σ_j w[j] · rows[j·stride + c]` for `c < acc.len()`, `j < w.len()` (8 channels per register block
/// with 16-lane vectors, 6 with 8-lane ones).
#[inline(always)]
pub fn combine<const FMA: bool, const W: usize>(w: &[Lanes], rows: &[f32], stride: usize, acc: &mut [Lanes]) {
    let n = acc.len();
    let mut c = 0;
    if W >= LANES {
        while c + 8 <= n {
            combine_block::<FMA, W, 8>(w, &rows[c..], stride, &mut acc[c..c + 8]);
            c += 8;
        }
    } else {
        while c + 6 <= n {
            combine_block::<FMA, W, 6>(w, &rows[c..], stride, &mut acc[c..c + 6]);
            c += 6;
        }
    }
    while c + 2 <= n {
        combine_block::<FMA, W, 2>(w, &rows[c..], stride, &mut acc[c..c + 2]);
        c += 2;
    }
    while c < n {
        combine_block::<FMA, W, 1>(w, &rows[c..], stride, &mut acc[c..c + 1]);
        c += 1;
    }
}

/// [`combine`] over several runs of keys: `acc[c] += Σ_j w[slot + j] · rows[(start + j)·stride + c]` for each
/// `(start, slot, len)` of `runs`, in order. With 16-lane vectors each register block of 8 channels stays in
/// registers across all the runs (one load and store of the accumulators per block, not per run).
#[inline(always)]
pub fn combine_runs<const FMA: bool, const W: usize>(w: &[Lanes], runs: &[(usize, usize, usize)], rows: &[f32], stride: usize, acc: &mut [Lanes]) {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        let n = acc.len();
        let mut c = 0;
        while c < n {
            let block = if n - c >= 8 { 8 } else if n - c >= 2 { 2 } else { 1 };
            let (rows, acc) = (&rows[c..], &mut acc[c..c + block]);
            // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where
            // the CPU has AVX-512 F (an `Isa` is checked against the CPU).
            unsafe {
                match block {
                    8 => zmm::combine_runs_block::<8>(w, runs, rows, stride, acc),
                    2 => zmm::combine_runs_block::<2>(w, runs, rows, stride, acc),
                    _ => zmm::combine_runs_block::<1>(w, runs, rows, stride, acc),
                }
            }
            c += block;
        }
        return;
    }
    for &(start, slot, len) in runs {
        combine::<FMA, W>(&w[slot..slot + len], &rows[start * stride..], stride, acc);
    }
}

#[inline(always)]
fn combine_block<const FMA: bool, const W: usize, const CB: usize>(
    w: &[Lanes],
    rows: &[f32],
    stride: usize,
    acc: &mut [Lanes],
) {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::combine_block::<CB>(w, rows, stride, acc) };
    }
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

/// `dst[j·stride + c] += Σ_l w[j][l] · b[l·width + c]` for `j < w.len()`, `c < width`; `width` a multiple of `W`
/// (callers pad rows with zeros). Vectors of `W` lanes run along the channels here: 3 keys × 4
/// vectors per block.
#[inline(always)]
pub fn update<const FMA: bool, const W: usize>(w: &[Lanes], b: &[f32], width: usize, dst: &mut [f32], stride: usize) {
    debug_assert!(width.is_multiple_of(W));
    let n = w.len();
    let mut j = 0;
    while j + 3 <= n {
        update_keys::<FMA, W, 3>(&w[j..j + 3], b, width, &mut dst[j * stride..], stride);
        j += 3;
    }
    while j < n {
        update_keys::<FMA, W, 1>(&w[j..j + 1], b, width, &mut dst[j * stride..], stride);
        j += 1;
    }
}

#[inline(always)]
fn update_keys<const FMA: bool, const W: usize, const JB: usize>(w: &[Lanes], b: &[f32], width: usize, dst: &mut [f32], stride: usize) {
    let mut c = 0;
    while c + 4 * W <= width {
        update_block::<FMA, W, JB, 4>(w, &b[c..], width, &mut dst[c..], stride);
        c += 4 * W;
    }
    while c < width {
        update_block::<FMA, W, JB, 1>(w, &b[c..], width, &mut dst[c..], stride);
        c += W;
    }
}

#[inline(always)]
fn update_block<const FMA: bool, const W: usize, const JB: usize, const VB: usize>(
    w: &[Lanes],
    b: &[f32],
    width: usize,
    dst: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::update_block::<JB, VB>(w, b, width, dst, stride) };
    }
    let mut acc = [[[0.0f32; W]; VB]; JB];
    for (jj, a) in acc.iter_mut().enumerate() {
        for (v, av) in a.iter_mut().enumerate() {
            av.copy_from_slice(&dst[jj * stride + v * W..][..W]);
        }
    }
    for l in 0..LANES {
        let row = &b[l * width..][..VB * W];
        for v in 0..VB {
            let mut bv = [0.0f32; W];
            bv.copy_from_slice(&row[v * W..(v + 1) * W]);
            for jj in 0..JB {
                let a = w[jj][l];
                for (x, y) in acc[jj][v].iter_mut().zip(&bv) {
                    *x = madd::<FMA>(a, *y, *x);
                }
            }
        }
    }
    for (jj, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            dst[jj * stride + v * W..][..W].copy_from_slice(av);
        }
    }
}

/// Rows of 16 lanes as bf16 pairs of lanes (the left side of [`update_bf16`]).
pub type LanePairs = [u32; LANES / 2];

/// `out[j]` = row `w[j]` rounded to bf16 (to nearest even), lanes `2i`, `2i + 1` paired in `out[j][i]`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn lane_pairs(w: &[Lanes], out: &mut [LanePairs]) {
    for (row, o) in w.iter().zip(out) {
        // SAFETY: the CPU has the features (this function's contract).
        unsafe { zmm::bf16_lanes(row, o) };
    }
}

/// `out[i·width + c]` = the bf16 bits of lanes `2i` (low half) and `2i + 1` (high half) of `x[c]`, `c < x.len()`,
/// for lanes below `live` (the others 0); `x` holds values exact in bf16. The right side of [`update_bf16`].
pub fn row_pairs(x: &[Lanes], live: usize, width: usize, out: &mut [u32]) {
    out.fill(0);
    for (c, lanes) in x.iter().enumerate() {
        for i in 0..LANES / 2 {
            let bits = |l: usize| if l < live { lanes[l].to_bits() >> 16 } else { 0 };
            out[i * width + c] = bits(2 * i) | (bits(2 * i + 1) << 16);
        }
    }
}

/// [`update`] in bf16 dot products: `dst[j·stride + c] += Σ_i dot2(w[j][i], b[i·width + c])` for `j < w.len()`,
/// `c < width` (a multiple of 16), `w` from [`lane_pairs`], `b` from [`row_pairs`]; 3 keys × 4 vectors per block.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn update_bf16(w: &[LanePairs], b: &[u32], width: usize, dst: &mut [f32], stride: usize) {
    debug_assert!(width.is_multiple_of(LANES));
    let n = w.len();
    let mut j = 0;
    while j < n {
        let jb = if n - j >= 3 { 3 } else { 1 };
        let (w, dst) = (&w[j..j + jb], &mut dst[j * stride..]);
        let mut c = 0;
        while c < width {
            let vectors = if width - c >= 4 * LANES { 4 } else { 1 };
            let (b, dst) = (&b[c..], &mut dst[c..]);
            // SAFETY: the CPU has the features (this function's contract).
            unsafe {
                match (jb, vectors) {
                    (3, 4) => zmm::update_bf16_block::<3, 4>(w, b, width, dst, stride),
                    (3, _) => zmm::update_bf16_block::<3, 1>(w, b, width, dst, stride),
                    (_, 4) => zmm::update_bf16_block::<1, 4>(w, b, width, dst, stride),
                    _ => zmm::update_bf16_block::<1, 1>(w, b, width, dst, stride),
                }
            }
            c += vectors * LANES;
        }
        j += jb;
    }
}

/// Sets `s[i][l] = −∞` where key column `x0 + i` is outside lane `l`'s interval `[lo[l], hi[l]]` (empty when
/// `lo > hi`).
#[inline(always)]
pub fn mask_columns<const W: usize>(s: &mut [Lanes], x0: f32, lo: &Lanes, hi: &Lanes) {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::mask_columns(s, x0, lo, hi) };
    }
    for (i, row) in s.iter_mut().enumerate() {
        let x = x0 + i as f32;
        for l in 0..LANES {
            row[l] = if x >= lo[l] && x <= hi[l] { row[l] } else { f32::NEG_INFINITY };
        }
    }
}

/// Lane-wise maximum of `s` (−∞ when empty).
#[inline(always)]
pub fn max_lanes<const W: usize>(s: &[Lanes]) -> Lanes {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::max_lanes(s) };
    }
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
pub fn exp2_shift<const FMA: bool, const W: usize>(s: &mut [Lanes], shift: &Lanes) -> Lanes {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::exp2_shift(s, shift) };
    }
    let mut sum = [0.0f32; LANES];
    for row in s.iter_mut() {
        for l in 0..LANES {
            row[l] = exp2_one::<FMA>(row[l] - shift[l]);
            sum[l] += row[l];
        }
    }
    sum
}

/// `rows[j] *= by` lane-wise (the output accumulators' rescale).
#[inline(always)]
pub fn scale_rows<const W: usize>(rows: &mut [Lanes], by: &Lanes) {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::scale_rows(rows, by) };
    }
    for row in rows.iter_mut() {
        for l in 0..LANES {
            row[l] *= by[l];
        }
    }
}

/// `ds[j] = p[j] · (ds[j] − delta)` lane-wise (the logits' gradient from the probabilities).
#[inline(always)]
pub fn softmax_grad<const W: usize>(ds: &mut [Lanes], p: &[Lanes], delta: &Lanes) {
    #[cfg(target_arch = "x86_64")]
    if W >= LANES {
        // SAFETY: `W = 16` is instantiated only in the AVX-512 clone of `isa_dispatch!`, which runs only where the
        // CPU has AVX-512 F (an `Isa` is checked against the CPU).
        return unsafe { zmm::softmax_grad(ds, p, delta) };
    }
    for (dsr, pr) in ds.iter_mut().zip(p) {
        for l in 0..LANES {
            dsr[l] = pr[l] * (dsr[l] - delta[l]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::{Isa, Level};

    /// The bf16 logits against the portable f32 ones on values exact in bf16, for every block size and tail (n up
    /// to 30), head dims 2 to 72 and keys in rows wider than the head dim.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_dots_match_f32_dots_on_bf16_values() {
        if Isa::new(Level::Avx512Bf16).is_err() {
            eprintln!("skipped: this CPU lacks avx512bf16");
            return;
        }
        let exact = |i: usize, m: usize| half::bf16::from_f32(((i * m % 29) as f32 - 14.0) * 0.173).to_f32();
        for d in [2, 8, 16, 64, 72] {
            let stride = d + 6;
            let a: Vec<Lanes> = (0..d).map(|c| std::array::from_fn(|l| exact(c * LANES + l, 7))).collect();
            let mut pairs = vec![[0u32; LANES]; d / 2];
            pair_lanes(&a, &mut pairs);
            let keys: Vec<f32> = (0..30 * stride).map(|i| exact(i, 11)).collect();
            let bits: Vec<u16> = keys.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            for n in 0..=30 {
                let (mut want, mut got) = (vec![[0.0f32; LANES]; n], vec![[0.0f32; LANES]; n]);
                dots::<true, 8>(&a, &keys, stride, n, &mut want);
                // SAFETY: the CPU has the features of the `Avx512Bf16` level (checked above), AVX-512 F, BW and BF16
                // among them.
                unsafe { dots_bf16(&pairs, &bits, stride, n, &mut got) };
                for (w, g) in want.iter().zip(&got) {
                    for l in 0..LANES {
                        assert!((w[l] - g[l]).abs() <= 1e-5 * (1.0 + w[l].abs()), "d={d} n={n}: {} vs {}", g[l], w[l]);
                    }
                }
            }
        }
    }

    /// The 16-lane transposes against the portable loops, for every channel tail (1 to 40 channels), every
    /// number of live lanes, rows wider than the channels; exact (they only move and scale values).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transposes_match_the_portable_loops() {
        if Isa::new(Level::Avx512).is_err() {
            eprintln!("skipped: this CPU lacks avx512f");
            return;
        }
        for channels in 1..=40 {
            let stride = channels + 3;
            let rows: Vec<f32> = (0..LANES * stride).map(|i| i as f32 * 0.5 - 7.0).collect();
            let by: Lanes = std::array::from_fn(|l| 1.0 + l as f32 * 0.25);
            for live in [0, 1, 7, 15, 16] {
                let (mut want, mut got) = (vec![[9.0f32; LANES]; channels], vec![[9.0f32; LANES]; channels]);
                rows_to_lanes::<8>(&rows, stride, live, 0.75, &mut want);
                rows_to_lanes::<16>(&rows, stride, live, 0.75, &mut got);
                assert_eq!(want, got, "rows_to_lanes channels={channels} live={live}");
                let (mut want, mut got) = (vec![-1.0f32; LANES * stride], vec![-1.0f32; LANES * stride]);
                lanes_to_rows::<8>(&got_lanes(&rows, stride, channels), &by, live, &mut want, stride);
                lanes_to_rows::<16>(&got_lanes(&rows, stride, channels), &by, live, &mut got, stride);
                assert_eq!(want, got, "lanes_to_rows channels={channels} live={live}");
            }
        }
    }

    /// Distinct values in the lanes layout: lane `l` of channel `c` from `rows[l·stride + c]`.
    fn got_lanes(rows: &[f32], stride: usize, channels: usize) -> Vec<Lanes> {
        (0..channels).map(|c| std::array::from_fn(|l| rows[l * stride + c])).collect()
    }

    fn assert_rows_close(want: &[f32], got: &[f32], what: &str) {
        for (w, g) in want.iter().zip(got) {
            assert!((w - g).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: {g} vs {w}");
        }
    }

    /// P·V and the key gradients' products in bf16 (keys paired from even or odd first keys, lanes paired, dead
    /// lanes) against the portable f32 ones on values exact in bf16, channel counts with every block tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_combine_and_update_match_f32_on_bf16_values() {
        if Isa::new(Level::Avx512Bf16).is_err() {
            eprintln!("skipped: this CPU lacks avx512bf16");
            return;
        }
        let exact = |i: usize, m: usize| half::bf16::from_f32(((i * m % 31) as f32 - 15.0) * 0.0625).to_f32();
        let bits = |x: f32| half::bf16::from_f32(x).to_bits();
        for channels in [2, 8, 11, 64, 72] {
            let keys = 21;
            let rows: Vec<f32> = (0..keys * channels).map(|i| exact(i, 7)).collect();
            let row_bits: Vec<u16> = rows.iter().map(|&x| bits(x)).collect();
            let mut key_pairs = Vec::new();
            crate::cpu::clear::key_pairs(&row_bits, channels, &mut key_pairs).unwrap();
            for (first, n) in [(0, 0), (0, 1), (1, 1), (0, 12), (3, 12), (4, 17), (1, 20)] {
                let w: Vec<Lanes> = (0..n).map(|j| std::array::from_fn(|l| exact(j * LANES + l, 5))).collect();
                let (mut want, mut got) = (vec![[0.5f32; LANES]; channels], vec![[0.5f32; LANES]; channels]);
                combine::<true, 8>(&w, &rows[first * channels..], channels, &mut want);
                let mut wp = vec![[0u32; LANES]; n / 2 + 2];
                // SAFETY: the CPU has the features of the `Avx512Bf16` level (checked above).
                unsafe {
                    let pairs = pair_key_lanes(&w, first, &mut wp);
                    combine_bf16(&wp[..pairs], &key_pairs[first / 2 * channels..], channels, &mut got);
                }
                assert_rows_close(want.as_flattened(), got.as_flattened(), &format!("combine c={channels} first={first} n={n}"));
            }
            let width = channels.div_ceil(LANES) * LANES;
            let lanes: Vec<Lanes> = (0..channels).map(|c| std::array::from_fn(|l| exact(c * LANES + l, 3))).collect();
            for live in [16, 9] {
                let mut b = vec![0.0f32; LANES * width];
                for (c, x) in lanes.iter().enumerate() {
                    for l in 0..live {
                        b[l * width + c] = x[l];
                    }
                }
                let mut b_pairs = vec![0u32; LANES / 2 * width];
                row_pairs(&lanes, live, width, &mut b_pairs);
                for n in [1, 3, 7] {
                    let w: Vec<Lanes> = (0..n).map(|j| std::array::from_fn(|l| exact(j * LANES + l, 11))).collect();
                    let stride = width + LANES;
                    let (mut want, mut got) = (vec![0.25f32; n * stride], vec![0.25f32; n * stride]);
                    update::<true, 8>(&w, &b, width, &mut want, stride);
                    let mut wl = vec![[0u32; LANES / 2]; n];
                    // SAFETY: the CPU has the features of the `Avx512Bf16` level (checked above).
                    unsafe {
                        lane_pairs(&w, &mut wl);
                        update_bf16(&wl, &b_pairs, width, &mut got, stride);
                    }
                    assert_rows_close(&want, &got, &format!("update c={channels} live={live} n={n}"));
                }
            }
        }
    }
}
