//! The PyO3 module `difattn._core` (built with the `python` feature): it turns Python arguments (grid and tile
//! tuples, tensor descriptors) into the validated types of `plan` and `cpu`, releases the GIL around the work,
//! and raises every validation error as `ValueError`. This file holds that conversion, the token orders and block
//! plans (returned as little-endian int64 / int32 bytes, the plan with its CSR transpose), the block engine's
//! entry points (which rebuild `cpu::block_attention::Plan` from the plan tensors on every call) and the module's
//! registration; `clear`, `linear`, `llsa` and `pisa` hold the glue of those methods' kernels.

mod clear;
mod linear;
mod llsa;
mod pisa;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use std::collections::HashMap;

use crate::cpu::block_attention::{self, Plan, Spatial};
use crate::cpu::view::{View, ViewError};
use crate::plan::blocks::{self, BlockPlan, ClearOptions, GratOptions, GratPattern};
use crate::plan::{self, GridError, TextPosition, Tile, TokenGrid};

/// A tensor as Python describes it: `(data_ptr, dtype name, shape, strides in elements)`.
type TensorArgs = (usize, String, Vec<usize>, Vec<i64>);

/// `(frames, height, width, text_tokens, text_position)` as the Python `TokenGrid` hands it over.
type GridArgs = (usize, usize, usize, usize, String);

fn value_error(err: GridError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

fn to_grid(args: GridArgs) -> PyResult<TokenGrid> {
    let (frames, height, width, text_tokens, position) = args;
    let text_position = match position.as_str() {
        "first" => TextPosition::First,
        "last" => TextPosition::Last,
        other => {
            return Err(PyValueError::new_err(format!(
                "text_position must be 'first' or 'last', got {other:?}"
            )))
        }
    };
    TokenGrid::new(frames, height, width, text_tokens, text_position).map_err(value_error)
}

fn to_tile(args: (usize, usize, usize)) -> PyResult<Tile> {
    Tile::new(args.0, args.1, args.2).map_err(value_error)
}

fn as_bytes<'py>(py: Python<'py>, values: &[i64]) -> Bound<'py, PyBytes> {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    PyBytes::new(py, &raw)
}

fn with_inverse<'py>(py: Python<'py>, perm: Vec<i64>) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let inv = plan::inverse(&perm)
        .ok_or_else(|| PyValueError::new_err("internal error: order is not a permutation"))?;
    Ok((as_bytes(py, &perm), as_bytes(py, &inv)))
}

/// Tile order of the image tokens and its inverse (int64 bytes each).
#[pyfunction]
fn tile_order<'py>(
    py: Python<'py>,
    grid: GridArgs,
    tile: (usize, usize, usize),
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let (grid, tile) = (to_grid(grid)?, to_tile(tile)?);
    let perm = py.detach(|| plan::tile_order(&grid, tile));
    with_inverse(py, perm)
}

/// Token counts of the tiles of `tile_order`, in that order (int64 bytes).
#[pyfunction]
fn tile_sizes<'py>(py: Python<'py>, grid: GridArgs, tile: (usize, usize, usize)) -> PyResult<Bound<'py, PyBytes>> {
    let (grid, tile) = (to_grid(grid)?, to_tile(tile)?);
    Ok(as_bytes(py, &plan::tile_sizes(&grid, tile)))
}

/// Group-major order (GRAT) and its inverse (int64 bytes each).
#[pyfunction]
fn group_order<'py>(
    py: Python<'py>,
    grid: GridArgs,
    group: (usize, usize, usize),
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let (grid, group) = (to_grid(grid)?, to_tile(group)?);
    let perm = py.detach(|| plan::group_order(&grid, group));
    with_inverse(py, perm)
}

/// Z-order (Morton, per frame) of the image tokens and its inverse (int64 bytes each).
#[pyfunction]
fn zorder<'py>(py: Python<'py>, grid: GridArgs) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let grid = to_grid(grid)?;
    let perm = py.detach(|| plan::zorder(&grid));
    with_inverse(py, perm)
}

fn view(name: &'static str, t: TensorArgs) -> PyResult<View> {
    View::new(name, t.0, &t.1, t.2, t.3).map_err(view_error)
}

fn view_error(err: ViewError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

fn as_i32_bytes<'py>(py: Python<'py>, values: &[i32]) -> Bound<'py, PyBytes> {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    PyBytes::new(py, &raw)
}

/// The arrays of a block plan, as int64 bytes (kinds and coords as int32 bytes).
fn plan_arrays<'py>(py: Python<'py>, plan: &BlockPlan, grid: &TokenGrid) -> HashMap<&'static str, Bound<'py, PyBytes>> {
    let kinds: Vec<i32> = plan.kinds.iter().map(|&k| k as i32).collect();
    let (t_indptr, t_indices, t_kinds) = blocks::transpose(&plan.indptr, &plan.indices, &plan.kinds, plan.k.num_blocks());
    let t_kinds: Vec<i32> = t_kinds.iter().map(|&k| k as i32).collect();
    HashMap::from([
        ("q_perm", as_bytes(py, &plan.q.perm)),
        ("q_offsets", as_bytes(py, &plan.q.offsets)),
        ("k_perm", as_bytes(py, &plan.k.perm)),
        ("k_offsets", as_bytes(py, &plan.k.offsets)),
        ("indptr", as_bytes(py, &plan.indptr)),
        ("indices", as_bytes(py, &plan.indices)),
        ("kinds", as_i32_bytes(py, &kinds)),
        ("t_indptr", as_bytes(py, &t_indptr)),
        ("t_indices", as_bytes(py, &t_indices)),
        ("t_kinds", as_i32_bytes(py, &t_kinds)),
        ("q_coords", as_i32_bytes(py, &plan.q.coords(grid))),
        ("k_coords", as_i32_bytes(py, &plan.k.coords(grid))),
    ])
}

/// CLEAR's block plan: `(arrays, max_d2, max_dt)`; the element mask keeps `dy²+dx² <= max_d2`, `|dt| <= max_dt`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn clear_plan<'py>(
    py: Python<'py>,
    grid: GridArgs,
    radius: f64,
    temporal_radius: f64,
    global_tokens: usize,
    q_tile: (usize, usize, usize),
    k_tile: (usize, usize, usize),
    q_block: usize,
    k_block: usize,
) -> PyResult<(HashMap<&'static str, Bound<'py, PyBytes>>, i64, i64)> {
    if !(radius.is_finite() && radius > 0.0 && temporal_radius.is_finite() && temporal_radius > 0.0) {
        return Err(PyValueError::new_err("radius and temporal_radius must be finite and > 0"));
    }
    let grid = to_grid(grid)?;
    let o = ClearOptions {
        radius,
        temporal_radius,
        global_tokens,
        q_tile: to_tile(q_tile)?,
        k_tile: to_tile(k_tile)?,
        q_block,
        k_block,
    };
    let (plan, max_d2, max_dt) = py.detach(|| blocks::clear_plan(&grid, &o)).map_err(value_error)?;
    Ok((plan_arrays(py, &plan, &grid), max_d2, max_dt))
}

/// GRAT's block plan (arrays); `pattern` is "neighbors" or "criss_cross".
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn grat_plan<'py>(
    py: Python<'py>,
    grid: GridArgs,
    group: (usize, usize, usize),
    pattern: &str,
    reach: usize,
    text_masked: bool,
    q_block: usize,
    k_block: usize,
) -> PyResult<HashMap<&'static str, Bound<'py, PyBytes>>> {
    let grid = to_grid(grid)?;
    let pattern = match pattern {
        "neighbors" => GratPattern::Neighbors { reach },
        "criss_cross" => GratPattern::CrissCross { three_d: grid.frames > 1 },
        other => return Err(PyValueError::new_err(format!("pattern must be 'neighbors' or 'criss_cross', got {other:?}"))),
    };
    let o = GratOptions { group: to_tile(group)?, pattern, text_masked, q_block, k_block };
    let plan = py.detach(|| blocks::grat_plan(&grid, &o)).map_err(value_error)?;
    Ok(plan_arrays(py, &plan, &grid))
}

/// The plan tensors handed to a kernel call, in this order.
type PlanArgs = (TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs);

fn build_plan(args: PlanArgs, key_valid: Option<TensorArgs>, max_d2: i64, max_dt: i64, nq: usize, nk: usize, batch: usize) -> PyResult<Plan> {
    let (q_perm, q_offsets, k_perm, k_offsets, indptr, indices, kinds, q_coords, k_coords) = args;
    let i64s = |name, t| view(name, t)?.to_i64_vec().map_err(view_error);
    let i32s = |name, t| view(name, t)?.to_i32_vec().map_err(view_error);
    let spatial = if max_d2 < 0 { Spatial::None } else { Spatial::Disc { max_d2, max_dt } };
    Plan::new(
        i64s("q_perm", q_perm)?,
        i64s("q_offsets", q_offsets)?,
        i64s("k_perm", k_perm)?,
        i64s("k_offsets", k_offsets)?,
        (i64s("indptr", indptr)?, i64s("indices", indices)?, i32s("kinds", kinds)?),
        i32s("q_coords", q_coords)?,
        i32s("k_coords", k_coords)?,
        key_valid.map(|t| i32s("key_valid", t)).transpose()?,
        spatial,
        nq,
        nk,
        batch,
    )
    .map_err(view_error)
}

/// Block-sparse attention forward on CPU: writes `out` and `lse`. `max_d2 < 0` means no spatial mask.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, out, lse, plan, key_valid, max_d2, max_dt, scale, threads))]
fn block_attention_forward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    out: TensorArgs,
    lse: TensorArgs,
    plan: PlanArgs,
    key_valid: Option<TensorArgs>,
    max_d2: i64,
    max_dt: i64,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, out, lse) = (view("q", q)?, view("k", k)?, view("v", v)?, view("out", out)?, view("lse", lse)?);
    q.expect(4, true).map_err(view_error)?;
    k.expect(4, true).map_err(view_error)?;
    let plan = build_plan(plan, key_valid, max_d2, max_dt, q.shape()[2], k.shape()[2], q.shape()[0])?;
    py.detach(|| block_attention::forward(&q, &k, &v, &out, &lse, &plan, scale, threads)).map_err(view_error)
}

/// Block-sparse attention backward on CPU: writes `dq`, `dk`, `dv`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, dout, lse, delta, dq, dk, dv, plan, key_valid, max_d2, max_dt, scale, threads))]
fn block_attention_backward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    dout: TensorArgs,
    lse: TensorArgs,
    delta: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    plan: PlanArgs,
    key_valid: Option<TensorArgs>,
    max_d2: i64,
    max_dt: i64,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (dout, lse, delta) = (view("dout", dout)?, view("lse", lse)?, view("delta", delta)?);
    let (dq, dk, dv) = (view("dq", dq)?, view("dk", dk)?, view("dv", dv)?);
    q.expect(4, true).map_err(view_error)?;
    k.expect(4, true).map_err(view_error)?;
    let plan = build_plan(plan, key_valid, max_d2, max_dt, q.shape()[2], k.shape()[2], q.shape()[0])?;
    py.detach(|| block_attention::backward(&q, &k, &v, &dout, &lse, &delta, &dq, &dk, &dv, &plan, scale, threads))
        .map_err(view_error)
}

/// How this extension was built.
#[pyfunction]
fn build_info() -> Vec<(&'static str, String)> {
    vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("profile", if cfg!(debug_assertions) { "debug" } else { "release" }.to_string()),
        ("target_arch", std::env::consts::ARCH.to_string()),
        ("target_os", std::env::consts::OS.to_string()),
    ]
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tile_order, m)?)?;
    m.add_function(wrap_pyfunction!(tile_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(group_order, m)?)?;
    m.add_function(wrap_pyfunction!(zorder, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(clear_plan, m)?)?;
    m.add_function(wrap_pyfunction!(grat_plan, m)?)?;
    m.add_function(wrap_pyfunction!(block_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(block_attention_backward, m)?)?;
    clear::register(m)?;
    linear::register(m)?;
    llsa::register(m)?;
    pisa::register(m)?;
    Ok(())
}
