//! The PyO3 module `difattn._core` (built with the `python` feature): it turns Python arguments (grid and tile
//! tuples, tensor descriptors) into the validated types of `plan` and `cpu`, releases the GIL around the work,
//! and raises every validation error as `ValueError` (a failed allocation as `MemoryError`, a failed parallel loop as
//! `RuntimeError`). This file holds that conversion, the token orders (returned as little-endian int64 bytes) and
//! the module's registration; `block` holds the block plan (a `#[pyclass]`) and the engine's entry points, `clear`,
//! `linear`, `llsa` and `pisa` the glue of those methods' kernels, `isa` the CPU instruction-set level and `threads`
//! the runtime of the kernels' parallel loops.

mod block;
mod clear;
mod isa;
mod linear;
mod llsa;
mod pisa;
mod threads;

use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::alloc::{self, AllocError};
use crate::cpu::common::OUT_OF_MEMORY;
use crate::cpu::parallel;
use crate::cpu::view::{View, ViewError};
use crate::plan::blocks::Layout;
use crate::plan::{self, GridError, TextPosition, Tile, TokenGrid};

/// A tensor as Python describes it: `(data_ptr, dtype name, shape, strides in elements)`.
type TensorArgs = (usize, String, Vec<usize>, Vec<i64>);

/// `(frames, height, width, text_tokens, text_position)` as the Python `TokenGrid` hands it over.
type GridArgs = (usize, usize, usize, usize, String);

fn value_error(err: GridError) -> PyErr {
    match err {
        GridError::OutOfMemory(err) => memory_error(err),
        err => PyValueError::new_err(err.to_string()),
    }
}

/// A failed allocation as `MemoryError`.
fn memory_error(err: AllocError) -> PyErr {
    PyMemoryError::new_err(err.0)
}

/// The little-endian bytes of `len` values (`W` bytes each), allocated fallibly.
fn le_bytes<'py, const W: usize>(py: Python<'py>, len: usize, values: impl Iterator<Item = [u8; W]>) -> PyResult<Bound<'py, PyBytes>> {
    let mut raw = alloc::with_capacity(alloc::size(&[len, W]).map_err(memory_error)?).map_err(memory_error)?;
    values.for_each(|v| raw.extend_from_slice(&v));
    Ok(PyBytes::new(py, &raw))
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

fn as_bytes<'py>(py: Python<'py>, values: &[i64]) -> PyResult<Bound<'py, PyBytes>> {
    le_bytes(py, values.len(), values.iter().map(|v| v.to_le_bytes()))
}

fn with_inverse<'py>(py: Python<'py>, perm: Result<Vec<i64>, AllocError>) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let perm = perm.map_err(memory_error)?;
    let inv = plan::inverse(&perm)
        .map_err(memory_error)?
        .ok_or_else(|| PyValueError::new_err("internal error: order is not a permutation"))?;
    Ok((as_bytes(py, &perm)?, as_bytes(py, &inv)?))
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

/// Image tokens in tiles and text in runs, cut into blocks of at most `block` tokens (text runs of `text_block`):
/// `(perm, offsets)`, int64 bytes each — the block layout of the engine's plans, and PISA's.
#[pyfunction]
fn token_blocks<'py>(
    py: Python<'py>,
    grid: GridArgs,
    tile: (usize, usize, usize),
    block: usize,
    text_block: usize,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let (grid, tile) = (to_grid(grid)?, to_tile(tile)?);
    let layout = py.detach(|| Layout::tiled(&grid, tile, block, text_block, 0)).map_err(value_error)?;
    Ok((as_bytes(py, &layout.perm)?, as_bytes(py, &layout.offsets)?))
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
    if err.0.starts_with(OUT_OF_MEMORY) {
        return PyMemoryError::new_err(err.0);
    }
    if err.0.starts_with(parallel::FAILED) {
        return PyRuntimeError::new_err(err.0);
    }
    PyValueError::new_err(err.0)
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
    m.add_function(wrap_pyfunction!(token_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(group_order, m)?)?;
    m.add_function(wrap_pyfunction!(zorder, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    block::register(m)?;
    clear::register(m)?;
    isa::register(m)?;
    linear::register(m)?;
    llsa::register(m)?;
    pisa::register(m)?;
    threads::register(m)?;
    Ok(())
}
