//! Backward: per tile, P from the saved log-sum-exp, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − delta)`; dq per tile, and dk,
//! dv accumulated in f32 buffers that the task owns (its share of one slice's tiles). With fewer slices than
//! threads a slice is split into parts whose buffers are summed at the end; no two tasks write the same row.

use super::forward::load_lanes;
use super::geometry::{self, Segment, Tile};
use crate::cpu::lanes::{self, LanePairs, Lanes, PairLanes, LANES};
use super::{bf16_products, check_inputs, err, key_products, padded, pieces, Form, Dims, Geometry, Inputs, Slice, SliceKeys, PIECE_KEYS};
use crate::alloc;
use crate::cpu::common::{active_isa, check_input, check_output, zeros, LOG2_E};
use crate::cpu::parallel::Team;
use crate::cpu::view::{DType, View, ViewError};

/// Key-gradient buffers of all parallel parts stay below this many bytes (fewer parts otherwise).
const PART_BUFFER_BYTES: usize = 1 << 30;

/// `dout (B, H, N, Dv)` (any strides), the forward's `lse` and `delta = rowsum(dout ⊙ out)`, both `(B, H, N)` f32.
pub struct Upstream<'a> {
    pub dout: &'a View,
    pub lse: &'a View,
    pub delta: &'a View,
}

/// Outputs, contiguous, any float dtype: `dq`, `dk` like q, `dv` like v, `global = Some((dkg, dvg))` with global
/// tokens.
pub struct Grads<'a> {
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
    pub global: Option<(&'a View, &'a View)>,
}

fn check(inp: &Inputs, up: &Upstream, grads: &Grads, geo: &Geometry) -> Result<Dims, ViewError> {
    let dims = check_inputs(inp, geo)?;
    let (bh, n) = ([dims.batch, dims.heads], geo.tokens());
    check_input(up.dout, &[bh[0], bh[1], n, dims.dv], None)?;
    check_input(up.lse, &[bh[0], bh[1], n], DType::F32)?;
    check_input(up.delta, &[bh[0], bh[1], n], DType::F32)?;
    check_output(grads.dq, &[bh[0], bh[1], n, dims.d], None)?;
    check_output(grads.dk, &[bh[0], bh[1], n, dims.d], None)?;
    check_output(grads.dv, &[bh[0], bh[1], n, dims.dv], None)?;
    match (grads.global, geo.global) {
        (Some((dkg, dvg)), g) => {
            check_output(dkg, &[bh[0], bh[1], g, dims.d], None)?;
            check_output(dvg, &[bh[0], bh[1], g, dims.dv], None)?;
        }
        (None, 0) => {}
        (None, _) => return err("global: gradients of the global tokens are missing"),
    }
    Ok(dims)
}

/// f32 key gradients of one slice (or one part of it), rows padded to a multiple of the vector width.
struct KeyGrads {
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Writes `dq`, `dk`, `dv` (and the global tokens' gradients).
pub fn backward(inp: &Inputs, up: &Upstream, grads: &Grads, geo: &Geometry, scale: f32, threads: usize) -> Result<(), ViewError> {
    let dims = check(inp, up, grads, geo)?;
    let layout = geometry::layout(geo)?;
    let (tiles, segments) = (&layout.tiles, &layout.segments);
    let slices = dims.slices();
    if slices == 0 {
        return Ok(());
    }
    let isa = active_isa()?;
    let w = isa.f32_lanes();
    // P's logits (q·k), dP (dout·v), dq (dS·k), dk (dSᵀ·q) and dv (Pᵀ·dout) in bf16 dot products where they can
    // (see `bf16_products`), P and dS rounded to bf16 for the last three.
    let global = inp.global.is_some();
    let forms = [
        if bf16_products(isa, inp.q, inp.k, dims.d, global) { Form::Pairs } else { Form::F32 },
        if bf16_products(isa, up.dout, inp.v, dims.dv, global) { Form::Bf16 } else { Form::F32 },
    ];
    let (d_pad, dv_pad) = (padded(dims.d, w), padded(dims.dv, w));
    let part_bytes = geo.keys() * (d_pad + dv_pad) * 4;
    let parts = if slices >= threads { 1 } else { threads.div_ceil(slices) };
    let parts = parts.min(PART_BUFFER_BYTES / (part_bytes * slices).max(1)).clamp(1, tiles.len().max(1));
    let team = Team::new(threads);
    let sums: Vec<Option<(usize, KeyGrads)>> = team.map(slices * parts, |task| {
        let (bh, part) = (task / parts, task % parts);
        let (b, h) = dims.slice(bh);
        let keys = SliceKeys::load(inp, geo, dims, (b, h), forms, None)?;
        let mut acc = KeyGrads { dk: zeros(geo.keys() * d_pad)?, dv: zeros(geo.keys() * dv_pad)? };
        let mut buf = Buffers::new(dims, w)?;
        let share = part * tiles.len() / parts..(part + 1) * tiles.len() / parts;
        let ctx = TileCtx { inp, up, dq: grads.dq, slice: Slice { keys: &keys, dims, b, h, scale } };
        for t in share {
            tile_fn(isa, &ctx, &tiles[t], segments.of(t), &mut buf, &mut acc)
        }
        if !keys.k_pairs.is_empty() {
            // The bf16 dk products take the queries unscaled (exact in bf16).
            acc.dk.iter_mut().for_each(|x| *x *= scale);
        }
        if parts == 1 {
            store_key_grads(grads, geo, dims, w, bh, &acc);
            Ok(None)
        } else {
            Ok(Some((bh, acc)))
        }
    })?;
    if parts > 1 {
        let mut by_slice: Vec<Vec<KeyGrads>> = alloc::collect((0..slices).map(|_| Vec::new()))?;
        for (bh, acc) in sums.into_iter().flatten() {
            alloc::push(&mut by_slice[bh], acc)?;
        }
        team.chunks_mut(&mut by_slice, 1, || Ok(()), |_, bh, parts| {
            let parts = &mut parts[0];
            let mut total = parts.pop().expect("every slice has at least one part");
            for p in parts {
                total.dk.iter_mut().zip(&p.dk).for_each(|(a, x)| *a += x);
                total.dv.iter_mut().zip(&p.dv).for_each(|(a, x)| *a += x);
            }
            store_key_grads(grads, geo, dims, w, bh, &total);
            Ok::<_, ViewError>(())
        })?;
    }
    Ok(())
}

fn store_key_grads(grads: &Grads, geo: &Geometry, dims: Dims, w: usize, bh: usize, acc: &KeyGrads) {
    let (b, h) = dims.slice(bh);
    let (d_pad, dv_pad) = (padded(dims.d, w), padded(dims.dv, w));
    for i in 0..geo.keys() {
        let (dk, dv, row) = match grads.global {
            Some((dkg, dvg)) if i >= geo.tokens() => (dkg, dvg, i - geo.tokens()),
            _ => (grads.dk, grads.dv, i),
        };
        // SAFETY: validated contiguous outputs; slice `bh` is stored by exactly one task, so it is the only one
        // touching this row of either.
        unsafe {
            dk.store_row(&[b, h, row], &acc.dk[i * d_pad..][..dims.d]);
            dv.store_row(&[b, h, row], &acc.dv[i * dv_pad..][..dims.dv]);
        }
    }
}

struct TileCtx<'a> {
    inp: &'a Inputs<'a>,
    up: &'a Upstream<'a>,
    dq: &'a View,
    slice: Slice<'a>,
}

struct Buffers {
    /// Queries as base-2 logit factors, channel-major.
    qt: Vec<Lanes>,
    /// Queries and dout as bf16 channel pairs, for bf16 products.
    qp: Vec<PairLanes>,
    dop: Vec<PairLanes>,
    /// Queries times `scale`, row-major `(LANES, padded(d))` (zero rows for dead lanes): the dk update's right side.
    q_rows: Vec<f32>,
    /// dout, channel-major (dP's left side) and row-major `(LANES, padded(dv))` (dead lanes zero: the dv update).
    dot: Vec<Lanes>,
    do_rows: Vec<f32>,
    dq: Vec<Lanes>,
    p: Vec<Lanes>,
    ds: Vec<Lanes>,
    /// The tile's 16 rows of q, then of dout, then of dq.
    row: Vec<f32>,
    /// For the bf16 products: the queries (unscaled) and dout as pairs of lanes (`lanes::row_pairs`), P and dS
    /// rows as pairs of lanes and dS as pairs of keys.
    q_pairs: Vec<u32>,
    do_pairs: Vec<u32>,
    p_lanes: Vec<LanePairs>,
    ds_lanes: Vec<LanePairs>,
    ds_keys: Vec<PairLanes>,
}

impl Buffers {
    fn new(dims: Dims, w: usize) -> Result<Self, ViewError> {
        Ok(Buffers {
            qt: zeros(dims.d)?,
            qp: zeros(dims.d / 2)?,
            dop: zeros(dims.dv / 2)?,
            q_rows: zeros(LANES * padded(dims.d, w))?,
            dot: zeros(dims.dv)?,
            do_rows: zeros(LANES * padded(dims.dv, w))?,
            dq: zeros(dims.d)?,
            p: zeros(PIECE_KEYS)?,
            ds: zeros(PIECE_KEYS)?,
            row: zeros(LANES * dims.d.max(dims.dv))?,
            q_pairs: zeros(LANES / 2 * padded(dims.d, w))?,
            do_pairs: zeros(LANES / 2 * padded(dims.dv, w))?,
            p_lanes: zeros(PIECE_KEYS)?,
            ds_lanes: zeros(PIECE_KEYS)?,
            ds_keys: zeros(PIECE_KEYS / 2 + 1)?,
        })
    }
}

crate::isa_dispatch!(fn tile_fn(ctx: &TileCtx, tile: &Tile, segments: &[Segment], buf: &mut Buffers, acc: &mut KeyGrads) = tile_body);

/// Fills the row-major copies of the queries (times `scale`) and of dout (rows padded for `W`-lane vectors; dead
/// lanes stay zero) where the f32 key-gradient updates read them: `q` for dk, `dout` for dv (the bf16 updates read
/// lane pairs instead).
#[inline(always)]
fn load_rows<const W: usize>(ctx: &TileCtx, tile: &Tile, [q, dout]: [bool; 2], buf: &mut Buffers) {
    let Dims { d, dv, .. } = ctx.slice.dims;
    let (d_pad, dv_pad) = (padded(d, W), padded(dv, W));
    if q {
        buf.q_rows.iter_mut().for_each(|x| *x = 0.0);
        lanes::lanes_to_rows::<W>(&buf.qt, &[1.0 / LOG2_E; LANES], tile.live, &mut buf.q_rows, d_pad);
    }
    if dout {
        buf.do_rows.iter_mut().for_each(|x| *x = 0.0);
        lanes::lanes_to_rows::<W>(&buf.dot, &[1.0; LANES], tile.live, &mut buf.do_rows, dv_pad);
    }
}

#[inline(always)]
fn tile_body<const FMA: bool, const W: usize>(ctx: &TileCtx, tile: &Tile, segments: &[Segment], buf: &mut Buffers, acc: &mut KeyGrads) {
    let Slice { keys, dims: Dims { d, dv, .. }, b, h, scale } = ctx.slice;
    let (d_pad, dv_pad) = (padded(d, W), padded(dv, W));
    let logit_mul = scale * LOG2_E;
    let (k_bf16, v_bf16) = if W >= LANES { (keys.k_bf16, keys.v_bf16) } else { (None, None) };
    let k_pairs = if W >= LANES && !keys.k_pairs.is_empty() { Some(&keys.k_pairs[..]) } else { None };
    if k_bf16.is_some() {
        // Pairs of the unscaled queries (exact in bf16): the logits are scaled instead.
        load_lanes::<W>(ctx.inp.q, b, h, tile, 1.0, &mut buf.row, &mut buf.qt);
        lanes::pair_lanes(&buf.qt, &mut buf.qp);
        if k_pairs.is_some() {
            lanes::row_pairs(&buf.qt, tile.live, d_pad, &mut buf.q_pairs);
        }
        buf.qt.iter_mut().flatten().for_each(|x| *x *= logit_mul);
    } else {
        load_lanes::<W>(ctx.inp.q, b, h, tile, logit_mul, &mut buf.row, &mut buf.qt);
    }
    load_lanes::<W>(ctx.up.dout, b, h, tile, 1.0, &mut buf.row, &mut buf.dot);
    if v_bf16.is_some() {
        lanes::pair_lanes(&buf.dot, &mut buf.dop);
        lanes::row_pairs(&buf.dot, tile.live, dv_pad, &mut buf.do_pairs);
    }
    load_rows::<W>(ctx, tile, [k_pairs.is_none(), v_bf16.is_none()], buf);
    let (mut lse2, mut delta) = ([0.0f32; LANES], [0.0f32; LANES]);
    for l in 0..LANES {
        lse2[l] = ctx.up.lse.load(&[b, h, tile.rows[l]]) * LOG2_E;
        delta[l] = ctx.up.delta.load(&[b, h, tile.rows[l]]);
    }
    buf.dq.iter_mut().for_each(|a| *a = [0.0; LANES]);
    for seg in segments {
        for (start, len) in pieces(seg) {
            key_products::<FMA, W>((&buf.qt, &buf.qp), (&keys.k_rows, k_bf16), d, (start, len), logit_mul, &mut buf.p);
            key_products::<FMA, W>((&buf.dot, &buf.dop), (&keys.v_rows, v_bf16), dv, (start, len), 1.0, &mut buf.ds);
            let (p, ds) = (&mut buf.p[..len], &mut buf.ds[..len]);
            if let Some(mask) = &seg.mask {
                lanes::mask_columns::<W>(p, (mask.x0 + (start - seg.start) as i64) as f32, &mask.lo, &mask.hi);
            }
            // p = 2^(s − lse₂) (the row sums that come with it are not needed), then dS = p ⊙ (dP − delta).
            lanes::exp2_shift::<FMA, W>(p, &lse2);
            lanes::softmax_grad::<W>(ds, p, &delta);
            let (dk, dv_rows) = (&mut acc.dk[start * d_pad..], &mut acc.dv[start * dv_pad..]);
            match k_pairs {
                #[cfg(target_arch = "x86_64")]
                Some(k_pairs) => {
                    // SAFETY: k pairs are made only on the `Avx512Bf16` level (`bf16_products`), whose features
                    // (AVX-512 F, BW, BF16) this CPU has.
                    unsafe {
                        let pairs = lanes::pair_key_lanes(ds, start, &mut buf.ds_keys);
                        lanes::combine_bf16(&buf.ds_keys[..pairs], &k_pairs[start / 2 * d..], d, &mut buf.dq);
                        lanes::lane_pairs(ds, &mut buf.ds_lanes);
                        lanes::update_bf16(&buf.ds_lanes[..len], &buf.q_pairs, d_pad, dk, d_pad);
                    }
                }
                _ => {
                    lanes::combine::<FMA, W>(ds, &keys.k_rows[start * d..], d, &mut buf.dq);
                    lanes::update::<FMA, W>(ds, &buf.q_rows, d_pad, dk, d_pad);
                }
            }
            match v_bf16 {
                #[cfg(target_arch = "x86_64")]
                Some(_) => {
                    // SAFETY: bf16 rows are loaded only on the `Avx512Bf16` level (`bf16_products`), whose features
                    // this CPU has.
                    unsafe {
                        lanes::lane_pairs(p, &mut buf.p_lanes);
                        lanes::update_bf16(&buf.p_lanes[..len], &buf.do_pairs, dv_pad, dv_rows, dv_pad);
                    }
                }
                _ => lanes::update::<FMA, W>(p, &buf.do_rows, dv_pad, dv_rows, dv_pad),
            }
        }
    }
    lanes::lanes_to_rows::<W>(&buf.dq, &[scale; LANES], tile.live, &mut buf.row, d);
    for l in 0..tile.live {
        // SAFETY: `dq` is a validated contiguous output; each query row belongs to exactly one tile and one task, so
        // this task is the only one touching it.
        unsafe { ctx.dq.store_row(&[b, h, tile.rows[l]], &buf.row[l * d..][..d]) };
    }
}
