//! PyO3 glue of the LLSA kernels: descriptors in, validated views and plan to `cpu::llsa`, the GIL released
//! around every kernel.

use pyo3::prelude::*;

use super::{view, view_error, TensorArgs};
use crate::cpu::llsa::{self, Grads, Inputs, Plan, Upstream};

/// The selection handed to a kernel call: `(fine, pooled, pb_offsets, pbias)` (see `cpu::llsa::Plan::new`).
type PlanArgs = (TensorArgs, TensorArgs, TensorArgs, TensorArgs);

fn build_plan(args: PlanArgs, n: usize, block_size: usize) -> PyResult<Plan> {
    let (fine, pooled, offsets, bias) = args;
    let (fine, pooled) = (view("fine", fine)?, view("pooled", pooled)?);
    let (offsets, bias) = (view("pb_offsets", offsets)?, view("pbias", bias)?);
    Plan::new(&fine, &pooled, &offsets, &bias, n, block_size).map_err(view_error)
}

/// LLSA forward on CPU: writes `out (B, H, N, Dv)` and `lse (B, H, N)` (f32).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, kp, vp, out, lse, plan, block_size, scale, threads))]
fn llsa_forward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    kp: TensorArgs,
    vp: TensorArgs,
    out: TensorArgs,
    lse: TensorArgs,
    plan: PlanArgs,
    block_size: usize,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, kp, vp) = (view("q", q)?, view("k", k)?, view("v", v)?, view("kp", kp)?, view("vp", vp)?);
    let (out, lse) = (view("out", out)?, view("lse", lse)?);
    q.expect(4, true).map_err(view_error)?;
    let plan = build_plan(plan, q.shape[2], block_size)?;
    let inputs = Inputs { q: &q, k: &k, v: &v, kp: &kp, vp: &vp };
    py.detach(|| llsa::forward(&inputs, &out, &lse, &plan, scale, threads)).map_err(view_error)
}

/// LLSA backward on CPU: writes `dq`, `dk`, `dv` (through the fine keys) and `dkp`, `dvp` (pooled keys).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, kp, vp, dout, lse, delta, dq, dk, dv, dkp, dvp, plan, block_size, scale, threads))]
fn llsa_backward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    kp: TensorArgs,
    vp: TensorArgs,
    dout: TensorArgs,
    lse: TensorArgs,
    delta: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    dkp: TensorArgs,
    dvp: TensorArgs,
    plan: PlanArgs,
    block_size: usize,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, kp, vp) = (view("q", q)?, view("k", k)?, view("v", v)?, view("kp", kp)?, view("vp", vp)?);
    let (dout, lse, delta) = (view("dout", dout)?, view("lse", lse)?, view("delta", delta)?);
    let (dq, dk, dv) = (view("dq", dq)?, view("dk", dk)?, view("dv", dv)?);
    let (dkp, dvp) = (view("dkp", dkp)?, view("dvp", dvp)?);
    q.expect(4, true).map_err(view_error)?;
    let plan = build_plan(plan, q.shape[2], block_size)?;
    let inputs = Inputs { q: &q, k: &k, v: &v, kp: &kp, vp: &vp };
    let upstream = Upstream { dout: &dout, lse: &lse, delta: &delta };
    let grads = Grads { dq: &dq, dk: &dk, dv: &dv, dkp: &dkp, dvp: &dvp };
    py.detach(|| llsa::backward(&inputs, &upstream, &grads, &plan, scale, threads)).map_err(view_error)
}

/// Adds this family's functions to `difattn._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(llsa_forward, m)?)?;
    m.add_function(wrap_pyfunction!(llsa_backward, m)?)?;
    Ok(())
}
