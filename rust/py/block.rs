//! Glue of the block engine: the plan as the `#[pyclass]` `difattn._core.BlockPlan` (built and validated once by
//! `plan::blocks`, then handed to the kernels as is) and the engine's forward and backward entry points.

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::{le_bytes, memory_error, to_grid, to_tile, view, view_error, GridArgs, TensorArgs};
use crate::alloc::OUT_OF_MEMORY;
use crate::cpu::block_attention;
use crate::plan::blocks::{self, ClearOptions, GratOptions, GratPattern, PlanError, Spatial};

fn plan_error(err: PlanError) -> PyErr {
    if err.0.starts_with(OUT_OF_MEMORY) {
        return PyMemoryError::new_err(err.0);
    }
    PyValueError::new_err(err.to_string())
}

/// A block plan of the attention engine (CLEAR, GRAT), immutable and shared between calls.
#[pyclass(frozen, module = "difattn._core", name = "BlockPlan")]
pub struct PyBlockPlan {
    plan: Arc<blocks::BlockPlan>,
}

#[pymethods]
impl PyBlockPlan {
    /// CLEAR's plan: discs of `radius` within `temporal_radius` frames, `global_tokens` extra keys.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn clear(
        py: Python<'_>,
        grid: GridArgs,
        radius: f64,
        temporal_radius: f64,
        global_tokens: usize,
        q_tile: (usize, usize, usize),
        k_tile: (usize, usize, usize),
        q_block: usize,
        k_block: usize,
    ) -> PyResult<Self> {
        let grid = to_grid(grid)?;
        let (q_tile, k_tile) = (to_tile(q_tile)?, to_tile(k_tile)?);
        let o = ClearOptions { radius, temporal_radius, global_tokens, q_tile, k_tile, q_block, k_block };
        let plan = py.detach(|| blocks::clear_plan(&grid, &o)).map_err(plan_error)?;
        Ok(PyBlockPlan { plan: Arc::new(plan) })
    }

    /// GRAT's plan: groups of `group`, `pattern` "neighbors" (within `reach`) or "criss_cross"; `text_masked`
    /// gives text keys masked entries (a padding mask applies there).
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn grat(
        py: Python<'_>,
        grid: GridArgs,
        group: (usize, usize, usize),
        pattern: &str,
        reach: usize,
        text_masked: bool,
        q_block: usize,
        k_block: usize,
    ) -> PyResult<Self> {
        let grid = to_grid(grid)?;
        let pattern = match pattern {
            "neighbors" => GratPattern::Neighbors { reach },
            "criss_cross" => GratPattern::CrissCross { three_d: grid.frames > 1 },
            other => return Err(PyValueError::new_err(format!("pattern must be 'neighbors' or 'criss_cross', got {other:?}"))),
        };
        let o = GratOptions { group: to_tile(group)?, pattern, text_masked, q_block, k_block };
        let plan = py.detach(|| blocks::grat_plan(&grid, &o)).map_err(plan_error)?;
        Ok(PyBlockPlan { plan: Arc::new(plan) })
    }

    /// Element-mask thresholds `(max_d2, max_dt)`: `dy² + dx² <= max_d2`, `|dt| <= max_dt` (`max_d2 < 0`: no disc).
    #[getter]
    fn thresholds(&self) -> (i64, i64) {
        match self.plan.spatial() {
            Spatial::None => (-1, 0),
            Spatial::Disc { max_d2, max_dt } => (max_d2, max_dt),
        }
    }

    /// The largest query block and the largest key block.
    #[getter]
    fn max_blocks(&self) -> (usize, usize) {
        (self.plan.max_q_block(), self.plan.max_k_block())
    }

    /// (query, key) pairs the engine computes over this plan (whole block pairs).
    #[getter]
    fn computed_pairs(&self) -> u64 {
        self.plan.computed_pairs()
    }

    /// The plan's arrays as little-endian bytes, for the Triton kernels' view (read once per device): int64
    /// `q_perm`, `q_offsets`, `k_perm`, `k_offsets`, `indptr`, `indices`, `t_indptr`, `t_indices`; int32 `kinds`,
    /// `t_kinds` and the `(t, y, x)` triples `q_coords`, `k_coords`.
    fn arrays<'py>(&self, py: Python<'py>) -> PyResult<HashMap<&'static str, Bound<'py, PyBytes>>> {
        let p = &self.plan;
        let i64s = |v: &[usize]| le_bytes(py, v.len(), v.iter().map(|&x| (x as i64).to_le_bytes()));
        let kinds = |v: &[u8]| le_bytes(py, v.len(), v.iter().map(|&x| i32::from(x).to_le_bytes()));
        let i32s = |v: &[i32]| le_bytes(py, v.len(), v.iter().map(|x| x.to_le_bytes()));
        Ok(HashMap::from([
            ("q_perm", i64s(p.q_perm())?),
            ("q_offsets", i64s(p.q_offsets())?),
            ("k_perm", i64s(p.k_perm())?),
            ("k_offsets", i64s(p.k_offsets())?),
            ("indptr", i64s(p.indptr())?),
            ("indices", i64s(p.indices())?),
            ("kinds", kinds(p.kinds())?),
            ("t_indptr", i64s(p.t_indptr())?),
            ("t_indices", i64s(p.t_indices())?),
            ("t_kinds", kinds(p.t_kinds())?),
            ("q_coords", i32s(p.q_coords())?),
            ("k_coords", i32s(&p.k_coords().map_err(memory_error)?)?),
        ]))
    }
}

/// Key validity `(B, Nk)` in the plan's key order, as 0/1 values (read from a bool, uint8 or int32 tensor).
fn key_validity(key_valid: Option<TensorArgs>) -> PyResult<Option<Vec<i32>>> {
    key_valid.map(|t| view("key_valid", t)?.to_i32_vec().map_err(view_error)).transpose()
}

/// Block-sparse attention forward on CPU over `plan`: writes `out` and `lse`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, out, lse, plan, key_valid, scale, threads))]
fn block_attention_forward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    out: TensorArgs,
    lse: TensorArgs,
    plan: &PyBlockPlan,
    key_valid: Option<TensorArgs>,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, out, lse) = (view("q", q)?, view("k", k)?, view("v", v)?, view("out", out)?, view("lse", lse)?);
    let (plan, valid) = (plan.plan.clone(), key_validity(key_valid)?);
    py.detach(|| block_attention::forward(&q, &k, &v, &out, &lse, &plan, valid.as_deref(), scale, threads))
        .map_err(view_error)
}

/// Block-sparse attention backward on CPU over `plan`: writes `dq`, `dk`, `dv`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, dout, lse, delta, dq, dk, dv, plan, key_valid, scale, threads))]
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
    plan: &PyBlockPlan,
    key_valid: Option<TensorArgs>,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (dout, lse, delta) = (view("dout", dout)?, view("lse", lse)?, view("delta", delta)?);
    let (dq, dk, dv) = (view("dq", dq)?, view("dk", dk)?, view("dv", dv)?);
    let (plan, valid) = (plan.plan.clone(), key_validity(key_valid)?);
    py.detach(|| {
        block_attention::backward(&q, &k, &v, &dout, &lse, &delta, &dq, &dk, &dv, &plan, valid.as_deref(), scale, threads)
    })
    .map_err(view_error)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBlockPlan>()?;
    m.add_function(wrap_pyfunction!(block_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(block_attention_backward, m)?)?;
    Ok(())
}
