//! PyO3 glue of the LLSA kernels: descriptors in, validated views and plan to `cpu::llsa`, the GIL released
//! around every kernel.

use pyo3::prelude::*;

use super::{view, view_error, TensorArgs};
use crate::cpu::llsa::{self, Grads, Inputs, Level, Plan, Pooling, Upstream};
use crate::cpu::view::View;

/// The selection handed to a kernel call: `(fine, pooled, pb_offsets, pbias)` (see `cpu::llsa::Plan::new`).
type PlanArgs = (TensorArgs, TensorArgs, TensorArgs, TensorArgs);

/// The plan, reading and writing the fine tensors through `rows` (int64 permutation of `0..N`) when given.
fn build_plan(args: PlanArgs, rows: Option<TensorArgs>, n: usize, block_size: usize, levels: usize) -> PyResult<Plan> {
    let (fine, pooled, offsets, bias) = args;
    let (fine, pooled) = (view("fine", fine)?, view("pooled", pooled)?);
    let (offsets, bias) = (view("pb_offsets", offsets)?, view("pbias", bias)?);
    let plan = Plan::new(&fine, &pooled, &offsets, &bias, n, block_size, levels).map_err(view_error)?;
    match rows {
        Some(rows) => plan.with_rows(&view("rows", rows)?).map_err(view_error),
        None => Ok(plan),
    }
}

/// LLSA forward on CPU: writes `out (B, H, N, Dv)` and `lse (B, H, N)` (f32, internal order); `rows`: the row of
/// q, k, v and out holding each internal position.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, kp, vp, out, lse, plan, rows, block_size, levels, scale, threads))]
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
    rows: Option<TensorArgs>,
    block_size: usize,
    levels: usize,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, kp, vp) = (view("q", q)?, view("k", k)?, view("v", v)?, view("kp", kp)?, view("vp", vp)?);
    let (out, lse) = (view("out", out)?, view("lse", lse)?);
    q.expect(4, true).map_err(view_error)?;
    let plan = build_plan(plan, rows, q.shape()[2], block_size, levels)?;
    let inputs = Inputs { q: &q, k: &k, v: &v, kp: &kp, vp: &vp };
    py.detach(|| llsa::forward(&inputs, &out, &lse, &plan, scale, threads)).map_err(view_error)
}

/// The pooling rule: `children` (each level-l token the mean of its children) or the mean of the fine tokens.
fn pooling(children: bool) -> Pooling {
    if children {
        Pooling::Children
    } else {
        Pooling::Tokens
    }
}

/// LLSA backward on CPU: writes `dq`, `dk`, `dv` (k and v through the fine and the pooled keys, pooled by the rule
/// `children`); `rows` as for the forward.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, kp, vp, dout, out, lse, dq, dk, dv, plan, rows, block_size, levels, children, scale, threads))]
fn llsa_backward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    kp: TensorArgs,
    vp: TensorArgs,
    dout: TensorArgs,
    out: TensorArgs,
    lse: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    plan: PlanArgs,
    rows: Option<TensorArgs>,
    block_size: usize,
    levels: usize,
    children: bool,
    scale: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v, kp, vp) = (view("q", q)?, view("k", k)?, view("v", v)?, view("kp", kp)?, view("vp", vp)?);
    let (dout, out, lse) = (view("dout", dout)?, view("out", out)?, view("lse", lse)?);
    let (dq, dk, dv) = (view("dq", dq)?, view("dk", dk)?, view("dv", dv)?);
    q.expect(4, true).map_err(view_error)?;
    let plan = build_plan(plan, rows, q.shape()[2], block_size, levels)?.with_pooling(pooling(children));
    let inputs = Inputs { q: &q, k: &k, v: &v, kp: &kp, vp: &vp };
    let upstream = Upstream { dout: &dout, out: &out, lse: &lse };
    let grads = Grads { dq: &dq, dk: &dk, dv: &dv };
    py.detach(|| llsa::backward(&inputs, &upstream, &grads, &plan, scale, threads)).map_err(view_error)
}

/// LLSA selection on CPU: per level (finest first) the pooled `queries`, `keys` (float32 `(B, H, n_l, D)`) and the
/// int64 `indices` `(B, H, n_l, K_l)` to write.
#[pyfunction]
#[pyo3(signature = (queries, keys, indices, block_size, threads))]
fn llsa_select(
    py: Python<'_>,
    queries: Vec<TensorArgs>,
    keys: Vec<TensorArgs>,
    indices: Vec<TensorArgs>,
    block_size: usize,
    threads: usize,
) -> PyResult<()> {
    if queries.len() != keys.len() || queries.len() != indices.len() {
        return Err(pyo3::exceptions::PyValueError::new_err("queries, keys and indices need one tensor per level"));
    }
    let views = |name, ts: Vec<TensorArgs>| ts.into_iter().map(|t| view(name, t)).collect::<PyResult<Vec<View>>>();
    let (queries, keys, indices) = (views("queries", queries)?, views("keys", keys)?, views("indices", indices)?);
    let levels: Vec<Level> =
        (0..queries.len()).map(|l| Level { queries: &queries[l], keys: &keys[l], out: &indices[l] }).collect();
    py.detach(|| llsa::select(&levels, block_size, threads)).map_err(view_error)
}

/// The LLSA pyramid on CPU: the float32 means of levels `1..=levels` of `src[b, h, perm[r]]` (rows read in Z-order
/// in place; each token the mean of its children with `children`, else of the fine tokens under it) concatenated in
/// `pooled (B, H, P, C)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (src, perm, pooled, block_size, levels, children, threads))]
fn llsa_zorder_pool(
    py: Python<'_>,
    src: TensorArgs,
    perm: TensorArgs,
    pooled: TensorArgs,
    block_size: usize,
    levels: usize,
    children: bool,
    threads: usize,
) -> PyResult<()> {
    let (src, perm, pooled) = (view("src", src)?, view("perm", perm)?, view("pooled", pooled)?);
    let rule = pooling(children);
    py.detach(|| llsa::zorder_pool(&src, &perm, &pooled, block_size, levels, rule, threads)).map_err(view_error)
}

/// Adds this family's functions to `difattn._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(llsa_forward, m)?)?;
    m.add_function(wrap_pyfunction!(llsa_backward, m)?)?;
    m.add_function(wrap_pyfunction!(llsa_select, m)?)?;
    m.add_function(wrap_pyfunction!(llsa_zorder_pool, m)?)?;
    Ok(())
}
