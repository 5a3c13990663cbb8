//! PyO3 glue of CLEAR's disc kernels on CPU: descriptors in, validated views to `cpu::clear`, the GIL released.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{to_grid, view, view_error, GridArgs, TensorArgs};
use crate::cpu::clear::{self, Geometry, Grads, Inputs, Upstream};
use crate::cpu::view::View;
use crate::plan::blocks::disc_thresholds;
use crate::plan::TextPosition;

/// The sequence and the mask's integer thresholds from the radii (`dy² + dx² < r²` ⇔ `<= max_d2`).
fn geometry(grid: GridArgs, global: usize, radius: f64, temporal_radius: f64) -> PyResult<Geometry> {
    let grid = to_grid(grid)?;
    let (max_d2, max_dt) =
        disc_thresholds(&grid, radius, temporal_radius).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(Geometry {
        frames: grid.frames,
        height: grid.height,
        width: grid.width,
        text: grid.text_tokens,
        text_first: grid.text_position == TextPosition::First,
        global,
        max_d2,
        max_dt,
    })
}

fn pair(names: (&'static str, &'static str), args: Option<(TensorArgs, TensorArgs)>) -> PyResult<Option<(View, View)>> {
    args.map(|(a, b)| Ok((view(names.0, a)?, view(names.1, b)?))).transpose()
}

/// Number of `global_kv` tokens (dim 2 of `k_g`; 0 without them).
fn global_tokens(global: &Option<(View, View)>) -> usize {
    global.as_ref().map_or(0, |(kg, _)| kg.shape().get(2).copied().unwrap_or(0))
}

fn refs(pair: &Option<(View, View)>) -> Option<(&View, &View)> {
    pair.as_ref().map(|(a, b)| (a, b))
}

/// CLEAR forward on CPU: writes `out (B, H, N, Dv)` and `lse (B, H, N)` (f32).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, global_kv, out, lse, grid, radius, temporal_radius, scale, threads))]
fn clear_forward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    global_kv: Option<(TensorArgs, TensorArgs)>,
    out: TensorArgs,
    lse: TensorArgs,
    grid: GridArgs,
    radius: f64,
    temporal_radius: f64,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, out, lse) = (view("q", q)?, view("k", k)?, view("v", v)?, view("out", out)?, view("lse", lse)?);
    let global = pair(("k_g", "v_g"), global_kv)?;
    let geo = geometry(grid, global_tokens(&global), radius, temporal_radius)?;
    let inp = Inputs { q: &q, k: &k, v: &v, global: refs(&global) };
    py.detach(|| clear::forward(&inp, &out, &lse, &geo, scale, threads)).map_err(view_error)
}

/// CLEAR backward on CPU: writes `dq`, `dk`, `dv` and, with global tokens, `dk_g`, `dv_g`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, global_kv, dout, lse, delta, dq, dk, dv, dglobal_kv, grid, radius, temporal_radius, scale, threads))]
fn clear_backward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    global_kv: Option<(TensorArgs, TensorArgs)>,
    dout: TensorArgs,
    lse: TensorArgs,
    delta: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    dglobal_kv: Option<(TensorArgs, TensorArgs)>,
    grid: GridArgs,
    radius: f64,
    temporal_radius: f64,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (dout, lse, delta) = (view("dout", dout)?, view("lse", lse)?, view("delta", delta)?);
    let (dq, dk, dv) = (view("dq", dq)?, view("dk", dk)?, view("dv", dv)?);
    let global = pair(("k_g", "v_g"), global_kv)?;
    let dglobal = pair(("dk_g", "dv_g"), dglobal_kv)?;
    let geo = geometry(grid, global_tokens(&global), radius, temporal_radius)?;
    let inp = Inputs { q: &q, k: &k, v: &v, global: refs(&global) };
    let up = Upstream { dout: &dout, lse: &lse, delta: &delta };
    let grads = Grads { dq: &dq, dk: &dk, dv: &dv, global: refs(&dglobal) };
    py.detach(|| clear::backward(&inp, &up, &grads, &geo, scale, threads)).map_err(view_error)
}

/// (query, key) pairs the CPU kernels compute on `grid` (all lanes of every tile, for the benchmark's work model).
#[pyfunction]
fn clear_computed_pairs(grid: GridArgs, global_tokens: usize, radius: f64, temporal_radius: f64) -> PyResult<u64> {
    clear::computed_pairs(&geometry(grid, global_tokens, radius, temporal_radius)?).map_err(|e| view_error(e.into()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(clear_computed_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(clear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(clear_backward, m)?)?;
    Ok(())
}
