//! PyO3 glue of the linear-attention kernels (DyDiLA, LiT): descriptors in, validated views to `cpu::linear`,
//! the GIL released around every kernel.

use pyo3::prelude::*;

use super::{view, view_error, TensorArgs};
use crate::cpu::linear::{self, DydilaGrads, DydilaInputs, Options, Stream, StreamGrads};
use crate::cpu::view::View;

/// One DyDiLA side: `(z, z_aux, gamma, gamma_aux, lambda)`, or its gradients in the same order.
type StreamArgs = (TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs);

/// Argument names of one side, for error messages.
const Q_NAMES: [&str; 5] = ["q", "q_aux", "gamma_q", "gamma_q_aux", "lambda_q"];
const K_NAMES: [&str; 5] = ["k", "k_aux", "gamma_k", "gamma_k_aux", "lambda_k"];
const DQ_NAMES: [&str; 5] = ["dq", "dq_aux", "dgamma_q", "dgamma_q_aux", "dlambda_q"];
const DK_NAMES: [&str; 5] = ["dk", "dk_aux", "dgamma_k", "dgamma_k_aux", "dlambda_k"];

fn views(args: StreamArgs, names: [&'static str; 5]) -> PyResult<[View; 5]> {
    let (a, b, c, d, e) = args;
    Ok([view(names[0], a)?, view(names[1], b)?, view(names[2], c)?, view(names[3], d)?, view(names[4], e)?])
}

fn stream(v: &[View; 5]) -> Stream<'_> {
    Stream { z: &v[0], z_aux: &v[1], gamma: &v[2], gamma_aux: &v[3], lambda: &v[4] }
}

fn stream_grads(v: &[View; 5]) -> StreamGrads<'_> {
    StreamGrads { dz: &v[0], dz_aux: &v[1], dgamma: &v[2], dgamma_aux: &v[3], dlambda: &v[4] }
}

/// Linear attention forward on CPU: writes `out`, `state (B, H, D, Dv)` and `ksum (B, H, D)` (f32).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, out, state, ksum, normalize, eps, threads))]
fn linear_attention_forward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    out: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    normalize: bool,
    eps: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (out, state, ksum) = (view("out", out)?, view("state", state)?, view("ksum", ksum)?);
    let opts = Options { normalize, eps };
    py.detach(|| linear::linear_forward(&q, &k, &v, &out, &state, &ksum, opts, threads)).map_err(view_error)
}

/// Linear attention backward on CPU: writes `dq`, `dk`, `dv`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, state, ksum, dout, dq, dk, dv, normalize, eps, threads))]
fn linear_attention_backward(
    py: Python<'_>,
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    dout: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    normalize: bool,
    eps: f32,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v) = (view("q", q)?, view("k", k)?, view("v", v)?);
    let (state, ksum, dout) = (view("state", state)?, view("ksum", ksum)?, view("dout", dout)?);
    let (dq, dk, dv) = (view("dq", dq)?, view("dk", dk)?, view("dv", dv)?);
    let opts = Options { normalize, eps };
    py.detach(|| linear::linear_backward(&q, &k, &v, &state, &ksum, &dout, [&dq, &dk, &dv], opts, threads))
        .map_err(view_error)
}

/// DyDiLA forward on CPU (prologue fused into the linear core): writes `out`, `state` and `ksum` of `K̂`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q_side, k_side, v, out, state, ksum, normalize, eps, threads))]
fn dydila_forward(
    py: Python<'_>,
    q_side: StreamArgs,
    k_side: StreamArgs,
    v: TensorArgs,
    out: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    normalize: bool,
    eps: f32,
    threads: usize,
) -> PyResult<()> {
    let (qs, ks, v) = (views(q_side, Q_NAMES)?, views(k_side, K_NAMES)?, view("v", v)?);
    let (out, state, ksum) = (view("out", out)?, view("state", state)?, view("ksum", ksum)?);
    let x = DydilaInputs { q: stream(&qs), k: stream(&ks), v: &v };
    let opts = Options { normalize, eps };
    py.detach(|| linear::dydila_forward(&x, &out, &state, &ksum, opts, threads)).map_err(view_error)
}

/// DyDiLA backward on CPU: writes the gradients of both sides (`dz`, `dz_aux`, `dγ`, `dγ_aux`, `dλ`) and `dv`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q_side, k_side, v, state, ksum, dout, dq_side, dk_side, dv, normalize, eps, threads))]
fn dydila_backward(
    py: Python<'_>,
    q_side: StreamArgs,
    k_side: StreamArgs,
    v: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    dout: TensorArgs,
    dq_side: StreamArgs,
    dk_side: StreamArgs,
    dv: TensorArgs,
    normalize: bool,
    eps: f32,
    threads: usize,
) -> PyResult<()> {
    let (qs, ks, v) = (views(q_side, Q_NAMES)?, views(k_side, K_NAMES)?, view("v", v)?);
    let (state, ksum, dout) = (view("state", state)?, view("ksum", ksum)?, view("dout", dout)?);
    let (dqs, dks, dv) = (views(dq_side, DQ_NAMES)?, views(dk_side, DK_NAMES)?, view("dv", dv)?);
    let x = DydilaInputs { q: stream(&qs), k: stream(&ks), v: &v };
    let grads = DydilaGrads { q: stream_grads(&dqs), k: stream_grads(&dks), dv: &dv };
    let opts = Options { normalize, eps };
    py.detach(|| linear::dydila_backward(&x, &state, &ksum, &dout, grads, opts, threads)).map_err(view_error)
}

/// Adds this family's functions to `difattn._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(linear_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(linear_attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(dydila_forward, m)?)?;
    m.add_function(wrap_pyfunction!(dydila_backward, m)?)?;
    Ok(())
}
