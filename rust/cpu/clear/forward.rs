//! Forward: per tile, an online softmax over its key segments, batched into pieces of up to `PIECE_KEYS` keys
//! (logits and the disc mask per segment, then one rescale, exp and P·V per batch), then `out` and the log-sum-exp (natural log, f32) per query.

use super::geometry::{self, Segment, Tile};
use crate::cpu::lanes::{self, Lanes, PairLanes, LANES};
use super::{bf16_products, check_inputs, key_products, pieces, Dims, Form, Geometry, Inputs, Slice, SliceKeys, PIECE_KEYS};
use crate::cpu::common::{active_isa, check_output, zeros, LN_2, LOG2_E};
use crate::cpu::parallel::Team;
use crate::cpu::view::{DType, View, ViewError};
use crate::cpu::vmath::{exp2_one, log2_one};

/// Writes `out (B, H, N, Dv)` (any float dtype, contiguous) and `lse (B, H, N)` (f32, contiguous).
pub fn forward(inp: &Inputs, out: &View, lse: &View, geo: &Geometry, scale: f32, threads: usize) -> Result<(), ViewError> {
    let dims = check_inputs(inp, geo)?;
    let n = geo.tokens();
    check_output(out, &[dims.batch, dims.heads, n, dims.dv], None)?;
    check_output(lse, &[dims.batch, dims.heads, n], DType::F32)?;
    let layout = geometry::layout(geo)?;
    let (tiles, segments) = (&layout.tiles, &layout.segments);
    let isa = active_isa()?;
    let global = inp.global.is_some();
    let k_form = if bf16_products(isa, inp.q, inp.k, dims.d, global) { Form::Bf16 } else { Form::F32 };
    // P·V in bf16 dot products too (P rounded to bf16, as the bf16 output will be) when v is bf16.
    let v_form = if bf16_products(isa, inp.q, inp.v, dims.dv, global) { Form::Pairs } else { Form::F32 };
    // A task per (slice, tile), slice-major: a worker loads a slice's keys when its next task is in another slice.
    Team::new(threads).for_each_init(
        dims.slices() * tiles.len(),
        || Ok((Buffers::new(dims)?, None)),
        |(buf, loaded), task| {
            let (bh, t) = (task / tiles.len(), task % tiles.len());
            let (b, h) = dims.slice(bh);
            let keys = match loaded {
                Some((at, keys)) if *at == bh => keys,
                slot => {
                    let spare = slot.take().map(|(_, keys)| keys);
                    &slot.insert((bh, SliceKeys::load(inp, geo, dims, (b, h), [k_form, v_form], spare)?)).1
                }
            };
            let ctx = TileCtx { q: inp.q, out, lse, slice: Slice { keys, dims, b, h, scale } };
            tile_fn(isa, &ctx, &tiles[t], segments.of(t), buf);
            Ok(())
        },
    )
}

struct TileCtx<'a> {
    q: &'a View,
    out: &'a View,
    lse: &'a View,
    slice: Slice<'a>,
}

struct Buffers {
    /// Queries, channel-major: `qt[c][l]`.
    qt: Vec<Lanes>,
    /// Queries as bf16 channel pairs, for bf16 logits.
    qp: Vec<PairLanes>,
    /// Output accumulators, channel-major.
    acc: Vec<Lanes>,
    /// Logits, then probabilities, of a batch of pieces.
    s: Vec<Lanes>,
    /// Probabilities as bf16 pairs of keys, for P·V in bf16.
    wp: Vec<PairLanes>,
    /// The batched pieces: `(first key, row in s, len)`.
    batch: Vec<(usize, usize, usize)>,
    /// The tile's 16 rows of q, then of the output.
    row: Vec<f32>,
}

impl Buffers {
    fn new(dims: Dims) -> Result<Self, ViewError> {
        Ok(Buffers {
            qt: zeros(dims.d)?,
            qp: zeros(dims.d / 2)?,
            acc: zeros(dims.dv)?,
            s: zeros(PIECE_KEYS)?,
            wp: zeros(PIECE_KEYS / 2 + 1)?,
            batch: Vec::new(),
            row: zeros(LANES * dims.d.max(dims.dv))?,
        })
    }
}

crate::isa_dispatch!(fn tile_fn(ctx: &TileCtx, tile: &Tile, segments: &[Segment], buf: &mut Buffers) = tile_body);

/// Loads the tile's rows of `t` (q, or dout) into `rows` (row `l` at `l·lanes.len()`; room for 16 rows) and from
/// there channel-major into `lanes`, times `mul`.
#[inline(always)]
pub(super) fn load_lanes<const W: usize>(t: &View, b: usize, h: usize, tile: &Tile, mul: f32, rows: &mut [f32], lanes: &mut [Lanes]) {
    let width = lanes.len();
    for (l, row) in rows.chunks_exact_mut(width).take(LANES).enumerate() {
        t.load_row(&[b, h, tile.rows[l]], row);
    }
    lanes::rows_to_lanes::<W>(rows, width, LANES, mul, lanes);
}

#[inline(always)]
fn tile_body<const FMA: bool, const W: usize>(ctx: &TileCtx, tile: &Tile, segments: &[Segment], buf: &mut Buffers) {
    let Slice { keys, dims: Dims { d, dv, .. }, b, h, scale } = ctx.slice;
    let logit_mul = scale * LOG2_E;
    let bf16_keys = if W >= LANES { keys.k_bf16 } else { None };
    if bf16_keys.is_some() {
        // Unscaled (exact in bf16): the logits are scaled instead.
        load_lanes::<W>(ctx.q, b, h, tile, 1.0, &mut buf.row, &mut buf.qt);
        lanes::pair_lanes(&buf.qt, &mut buf.qp);
    } else {
        load_lanes::<W>(ctx.q, b, h, tile, logit_mul, &mut buf.row, &mut buf.qt);
    }
    let mut state = Softmax { m: [f32::NEG_INFINITY; LANES], l: [0.0; LANES] };
    buf.acc.iter_mut().for_each(|a| *a = [0.0; LANES]);
    // Logits of consecutive pieces share one buffer and one softmax update (`flush`).
    let mut filled = 0;
    buf.batch.clear();
    for seg in segments {
        for (start, len) in pieces(seg) {
            if filled + len > PIECE_KEYS {
                flush::<FMA, W>(ctx, buf, filled, &mut state);
                filled = 0;
            }
            let s = &mut buf.s[filled..];
            key_products::<FMA, W>((&buf.qt, &buf.qp), (&keys.k_rows, bf16_keys), d, (start, len), logit_mul, s);
            if let Some(mask) = &seg.mask {
                lanes::mask_columns::<W>(&mut s[..len], (mask.x0 + (start - seg.start) as i64) as f32, &mask.lo, &mask.hi);
            }
            buf.batch.push((start, filled, len));
            filled += len;
        }
    }
    flush::<FMA, W>(ctx, buf, filled, &mut state);
    let inv: Lanes = std::array::from_fn(|l| 1.0 / state.l[l]);
    lanes::lanes_to_rows::<W>(&buf.acc, &inv, tile.live, &mut buf.row, dv);
    for l in 0..tile.live {
        let at = [b, h, tile.rows[l]];
        // SAFETY: `out`, `lse` are validated contiguous outputs; each query row belongs to exactly one tile, so this
        // task is the only one touching this row of either.
        unsafe {
            ctx.out.store_row(&at, &buf.row[l * dv..][..dv]);
            ctx.lse.store_f32(&at, (state.m[l] + log2_one::<FMA>(state.l[l])) * LN_2);
        }
    }
}

/// Running maximum and sum of the online softmax, per lane.
struct Softmax {
    m: Lanes,
    l: Lanes,
}

/// Folds the batched logits `s[..filled]` into the softmax and the output accumulators.
#[inline(always)]
fn flush<const FMA: bool, const W: usize>(ctx: &TileCtx, buf: &mut Buffers, filled: usize, state: &mut Softmax) {
    let s = &mut buf.s[..filled];
    let piece_max = lanes::max_lanes::<W>(s);
    let mut shift = [0.0f32; LANES];
    let mut alpha = [1.0f32; LANES];
    for l in 0..LANES {
        let m_new = if piece_max[l] > state.m[l] { piece_max[l] } else { state.m[l] };
        // Lanes that have seen no allowed key yet keep shift 0 (their probabilities are exact zeros).
        if m_new != f32::NEG_INFINITY {
            alpha[l] = exp2_one::<FMA>(state.m[l] - m_new);
            shift[l] = m_new;
        }
        state.m[l] = m_new;
    }
    if alpha != [1.0; LANES] {
        lanes::scale_rows::<W>(&mut buf.acc, &alpha);
        for l in 0..LANES {
            state.l[l] *= alpha[l];
        }
    }
    let sums = lanes::exp2_shift::<FMA, W>(s, &shift);
    for l in 0..LANES {
        state.l[l] += sums[l];
    }
    let (dv, keys) = (ctx.slice.dims.dv, ctx.slice.keys);
    match () {
        #[cfg(target_arch = "x86_64")]
        () if W >= LANES && !keys.v_pairs.is_empty() => {
            for &(start, slot, len) in &buf.batch {
                let p = &buf.s[slot..slot + len];
                // SAFETY: v pairs are made only on the `Avx512Bf16` level (`bf16_products`), whose features (AVX-512
                // F, BW, BF16) this CPU has.
                unsafe {
                    let pairs = lanes::pair_key_lanes(p, start, &mut buf.wp);
                    lanes::combine_bf16(&buf.wp[..pairs], &keys.v_pairs[start / 2 * dv..], dv, &mut buf.acc);
                }
            }
        }
        () => lanes::combine_runs::<FMA, W>(&buf.s, &buf.batch, &keys.v_rows, dv, &mut buf.acc),
    }
    buf.batch.clear();
}
