//! PyO3 glue of the PISA kernels: descriptors in, a validated layout, selection and views to `cpu::pisa`, the GIL
//! released around every kernel (the validation included).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{view, view_error, TensorArgs};
use crate::cpu::pisa::{self, BackwardOutputs, BackwardRows, Inputs, Layout, Selection, StatsGrads, StatsOutputs};
use crate::cpu::view::{View, ViewError};

/// `(perm, offsets, blocks)`: 1-D int64 tensors (blocks flattened from `(B, H, M, k)`).
type PlanArgs = (TensorArgs, TensorArgs, TensorArgs);

/// `(key_mean, value_mean)`: f32 `(B, H, M, D)` and `(B, H, M, Dv)`.
type CentroidArgs = (TensorArgs, TensorArgs);

struct Plan {
    perm: View,
    offsets: View,
    blocks: View,
}

impl Plan {
    fn new(args: PlanArgs) -> PyResult<Self> {
        Ok(Plan { perm: view("perm", args.0)?, offsets: view("offsets", args.1)?, blocks: view("blocks", args.2)? })
    }

    /// Reads and validates the layout and selection for `q (B, H, N, D)`.
    fn build(&self, q: &View) -> Result<(Layout, Selection), ViewError> {
        q.expect(4, true)?;
        let layout = Layout::new(&self.perm.to_i64_vec()?, &self.offsets.to_i64_vec()?, q.shape()[2])?;
        let selection = Selection::new(&self.blocks.to_i64_vec()?, q.shape()[0] * q.shape()[1], layout.num_blocks())?;
        Ok((layout, selection))
    }
}

fn check_scale(scale: f32) -> PyResult<()> {
    if scale.is_finite() && scale > 0.0 {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!("scale must be finite and > 0, got {scale}")))
    }
}

/// PISA block statistics on CPU: writes `key_mean`, `value_mean` and, when given, `moment_mean` (H̄, the mean moment
/// per token), `query_mean` (needs `q`), `key_variance` and `spread = (out, c)` (‖H_j − c·H̄‖_F; c ≠ 0 needs
/// `moment_mean`). `layout = (perm, offsets)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (k, v, q, layout, key_mean, value_mean, moment_mean, query_mean, key_variance, spread, threads))]
fn pisa_stats(
    py: Python<'_>,
    k: TensorArgs,
    v: TensorArgs,
    q: Option<TensorArgs>,
    layout: (TensorArgs, TensorArgs),
    key_mean: TensorArgs,
    value_mean: TensorArgs,
    moment_mean: Option<TensorArgs>,
    query_mean: Option<TensorArgs>,
    key_variance: Option<TensorArgs>,
    spread: Option<(TensorArgs, f32)>,
    threads: usize,
) -> PyResult<()> {
    let (k, v, q) = (view("k", k)?, view("v", v)?, q.map(|t| view("q", t)).transpose()?);
    let (perm, offsets) = (view("perm", layout.0)?, view("offsets", layout.1)?);
    let (key_mean, value_mean) = (view("key_mean", key_mean)?, view("value_mean", value_mean)?);
    let moment_mean = moment_mean.map(|t| view("moment_mean", t)).transpose()?;
    let query_mean = query_mean.map(|t| view("query_mean", t)).transpose()?;
    let key_variance = key_variance.map(|t| view("key_variance", t)).transpose()?;
    let spread = spread.map(|(t, centre)| view("spread", t).map(|t| (t, centre))).transpose()?;
    py.detach(|| {
        k.expect(4, true)?;
        let layout = Layout::new(&perm.to_i64_vec()?, &offsets.to_i64_vec()?, k.shape()[2])?;
        let outs = StatsOutputs {
            key_mean: &key_mean,
            value_mean: &value_mean,
            moment_mean: moment_mean.as_ref(),
            query_mean: query_mean.as_ref(),
            key_variance: key_variance.as_ref(),
            spread: spread.as_ref().map(|(t, centre)| (t, *centre)),
        };
        pisa::stats(&k, &v, q.as_ref(), &layout, &outs, threads)
    })
    .map_err(view_error)
}

/// The backward of `pisa_stats`' means and mean moment on CPU: writes `dk`, `dv` (like k, v) from `dkey_mean`,
/// `dvalue_mean`, `dmoment_mean` (f32; None adds nothing) and the forward's `key_mean`, `value_mean`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (k, v, layout, key_mean, value_mean, dkey_mean, dvalue_mean, dmoment_mean, dk, dv, threads))]
fn pisa_stats_backward(
    py: Python<'_>,
    k: TensorArgs,
    v: TensorArgs,
    layout: (TensorArgs, TensorArgs),
    key_mean: TensorArgs,
    value_mean: TensorArgs,
    dkey_mean: Option<TensorArgs>,
    dvalue_mean: Option<TensorArgs>,
    dmoment_mean: Option<TensorArgs>,
    dk: TensorArgs,
    dv: TensorArgs,
    threads: usize,
) -> PyResult<()> {
    let (k, v) = (view("k", k)?, view("v", v)?);
    let (perm, offsets) = (view("perm", layout.0)?, view("offsets", layout.1)?);
    let (key_mean, value_mean) = (view("key_mean", key_mean)?, view("value_mean", value_mean)?);
    let dkey_mean = dkey_mean.map(|t| view("dkey_mean", t)).transpose()?;
    let dvalue_mean = dvalue_mean.map(|t| view("dvalue_mean", t)).transpose()?;
    let dmoment_mean = dmoment_mean.map(|t| view("dmoment_mean", t)).transpose()?;
    let (dk, dv) = (view("dk", dk)?, view("dv", dv)?);
    py.detach(|| {
        k.expect(4, true)?;
        let layout = Layout::new(&perm.to_i64_vec()?, &offsets.to_i64_vec()?, k.shape()[2])?;
        let grads = StatsGrads {
            dkey_mean: dkey_mean.as_ref(),
            dvalue_mean: dvalue_mean.as_ref(),
            dmoment_mean: dmoment_mean.as_ref(),
            dk: &dk,
            dv: &dv,
        };
        pisa::stats_backward(&k, &v, &layout, &key_mean, &value_mean, &grads, threads)
    })
    .map_err(view_error)
}

/// PISA forward on CPU: writes `out`, `lse` and `zeta`; `moment_mean` (H̄, f32) for the hybrid order, else None.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, centroids, moment_mean, out, lse, zeta, plan, scale, threads))]
fn pisa_forward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    centroids: CentroidArgs,
    moment_mean: Option<TensorArgs>,
    out: TensorArgs,
    lse: TensorArgs,
    zeta: TensorArgs,
    plan: PlanArgs,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    check_scale(scale)?;
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (key_mean, value_mean) = (view("key_mean", centroids.0)?, view("value_mean", centroids.1)?);
    let moment_mean = moment_mean.map(|t| view("moment_mean", t)).transpose()?;
    let (out, lse, zeta) = (view("out", out)?, view("lse", lse)?, view("zeta", zeta)?);
    let plan = Plan::new(plan)?;
    py.detach(|| {
        let (layout, selection) = plan.build(&q)?;
        let x = Inputs { q: &q, k: &k, v: &v, key_mean: &key_mean, value_mean: &value_mean, layout: &layout, selection: &selection, scale };
        pisa::forward(&x, moment_mean.as_ref(), &out, &lse, &zeta, threads)
    })
    .map_err(view_error)
}

/// PISA backward on CPU: writes `dq`, `dk`, `dv` (exact entries), `dkey_mean`, `dvalue_mean` and, with
/// `moment_mean` (hybrid order), `dmoment_mean`. `rows = (out, dout, lse, zeta)` of the forward.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, centroids, moment_mean, rows, grads, centroid_grads, dmoment_mean, plan, scale, threads))]
fn pisa_backward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    centroids: CentroidArgs,
    moment_mean: Option<TensorArgs>,
    rows: (TensorArgs, TensorArgs, TensorArgs, TensorArgs),
    grads: (TensorArgs, TensorArgs, TensorArgs),
    centroid_grads: CentroidArgs,
    dmoment_mean: Option<TensorArgs>,
    plan: PlanArgs,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    check_scale(scale)?;
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (key_mean, value_mean) = (view("key_mean", centroids.0)?, view("value_mean", centroids.1)?);
    let moment_mean = moment_mean.map(|t| view("moment_mean", t)).transpose()?;
    let (out, dout, lse, zeta) = (view("out", rows.0)?, view("dout", rows.1)?, view("lse", rows.2)?, view("zeta", rows.3)?);
    let (dq, dk, dv) = (view("dq", grads.0)?, view("dk", grads.1)?, view("dv", grads.2)?);
    let (dkey_mean, dvalue_mean) = (view("dkey_mean", centroid_grads.0)?, view("dvalue_mean", centroid_grads.1)?);
    let dmoment_mean = dmoment_mean.map(|t| view("dmoment_mean", t)).transpose()?;
    let plan = Plan::new(plan)?;
    py.detach(|| {
        let (layout, selection) = plan.build(&q)?;
        let x = Inputs { q: &q, k: &k, v: &v, key_mean: &key_mean, value_mean: &value_mean, layout: &layout, selection: &selection, scale };
        let rows = BackwardRows { out: &out, dout: &dout, lse: &lse, zeta: &zeta, moment_mean: moment_mean.as_ref() };
        let outs = BackwardOutputs {
            dq: &dq,
            dk: &dk,
            dv: &dv,
            dkey_mean: &dkey_mean,
            dvalue_mean: &dvalue_mean,
            dmoment_mean: dmoment_mean.as_ref(),
        };
        pisa::backward(&x, &rows, &outs, threads)
    })
    .map_err(view_error)
}

/// Adds this family's functions to `difattn._core`.
/// PISA's routing selection on CPU: writes `blocks (B, H, M, k)` int64 (contiguous), each row's `k` key blocks of
/// highest `score (B, H, M, Mk)` (f32) in the order of a stable descending sort (ties to the lower id, NaN first).
#[pyfunction]
fn pisa_top_blocks(py: Python<'_>, score: TensorArgs, blocks: TensorArgs, threads: usize) -> PyResult<()> {
    let (score, blocks) = (view("score", score)?, view("blocks", blocks)?);
    py.detach(|| pisa::top_blocks(&score, &blocks, threads)).map_err(view_error)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pisa_top_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(pisa_stats, m)?)?;
    m.add_function(wrap_pyfunction!(pisa_stats_backward, m)?)?;
    m.add_function(wrap_pyfunction!(pisa_forward, m)?)?;
    m.add_function(wrap_pyfunction!(pisa_backward, m)?)?;
    Ok(())
}
