//! Where the feature rows `Q̂`, `K̂` of the linear core come from and where their gradients go: the inputs
//! themselves (`Plain`, linear attention) or the DyDiLA prologue (`Dydila`: power maps with per-token exponents
//! and the token differential), recomputed per block in the forward and in the backward.

use super::vmath::{dot, power_row, power_row_grad};
use crate::cpu::view::{DType, View};

/// The two sides of the core: queries (read out) and keys (reduced into the state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Query = 0,
    Key = 1,
}

/// Rows `n0..n0 + len` of head `(b, h)`.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub b: usize,
    pub h: usize,
    pub n0: usize,
    pub len: usize,
}

/// A source of feature rows and a sink for their gradients.
pub trait FeatureMap: Sync {
    type Scratch: Send;

    /// Per-thread buffers.
    fn scratch(&self) -> Self::Scratch;

    /// Writes the feature rows of `side` into `dst` (`rows.len x D`, row-major).
    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], scratch: &mut Self::Scratch);

    /// Back-propagates `grad` (`rows.len x D`: ∂L/∂ of the feature rows) to the inputs and writes their
    /// gradients.
    ///
    /// # Safety
    /// The caller must be the only writer of these rows, and the gradient views validated outputs.
    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], scratch: &mut Self::Scratch);
}

/// One element of a validated float view at a full index (`idx` inside the shape).
pub fn load_scalar(view: &View, idx: &[usize]) -> f32 {
    let off = view.offset(idx);
    // SAFETY: the view was validated by `View::new` and its shape checked by the caller; `idx` is in range.
    unsafe {
        match view.dtype {
            DType::F32 => *(view.ptr as *const f32).add(off),
            DType::F16 => (*(view.ptr as *const half::f16).add(off)).to_f32(),
            DType::BF16 => (*(view.ptr as *const half::bf16).add(off)).to_f32(),
            _ => f32::NAN, // rejected by the shape/dtype checks before any kernel runs
        }
    }
}

/// Reads `rows` of a `(B, H, N, W)` view into `dst` (`rows.len x W`) as f32.
pub fn load_rows(view: &View, rows: Rows, dst: &mut [f32]) {
    let w = view.shape[3];
    for (r, row) in dst[..rows.len * w].chunks_exact_mut(w).enumerate() {
        view.load_row(&[rows.b, rows.h, rows.n0 + r], row);
    }
}

/// # Safety
/// As for [`View::store_row`]: one writer per row, validated output.
pub unsafe fn store_rows(view: &View, rows: Rows, src: &[f32]) {
    let w = view.shape[3];
    for (r, row) in src[..rows.len * w].chunks_exact(w).enumerate() {
        view.store_row(&[rows.b, rows.h, rows.n0 + r], row);
    }
}

/// Linear attention: the features are q and k as given.
pub struct Plain<'a> {
    pub inputs: [&'a View; 2],
    /// `[dq, dk]` in the backward.
    pub grads: Option<[&'a View; 2]>,
}

impl FeatureMap for Plain<'_> {
    type Scratch = ();

    fn scratch(&self) {}

    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], _: &mut ()) {
        load_rows(self.inputs[side as usize], rows, dst);
    }

    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], _: &mut ()) {
        if let Some(grads) = self.grads {
            store_rows(grads[side as usize], rows, grad);
        }
    }
}

/// One side of DyDiLA: `Ẑ = φ_γ(z) − λ φ_γaux(z_aux)`, with per-token `(B, H, N)` γ, γ_aux, λ.
#[derive(Clone, Copy)]
pub struct Stream<'a> {
    pub z: &'a View,
    pub z_aux: &'a View,
    pub gamma: &'a View,
    pub gamma_aux: &'a View,
    pub lambda: &'a View,
}

/// The gradient outputs of one side: `dz`, `dz_aux` like z, and `dγ`, `dγ_aux`, `dλ` as `(B, H, N)` f32.
pub struct StreamGrads<'a> {
    pub dz: &'a View,
    pub dz_aux: &'a View,
    pub dgamma: &'a View,
    pub dgamma_aux: &'a View,
    pub dlambda: &'a View,
}

/// DyDiLA's prologue: `[query side, key side]`.
pub struct Dydila<'a> {
    pub sides: [Stream<'a>; 2],
    pub grads: Option<[StreamGrads<'a>; 2]>,
    pub eps: f32,
}

/// Row buffers of the two power maps of one token (main and aux stream).
pub struct DydilaScratch {
    z: [Vec<f32>; 2],
    r: [Vec<f32>; 2],
    ls: [Vec<f32>; 2],
    p: [Vec<f32>; 2],
    g: Vec<f32>,
    dz: [Vec<f32>; 2],
}

/// `(n1, n2)` of the two maps of one token, after [`power_row`] filled the scratch rows.
type Norms = [(f32, f32); 2];

impl Dydila<'_> {
    fn head_dim(&self) -> usize {
        self.sides[0].z.shape[3]
    }

    /// Loads and maps the main and aux rows of token `n`; returns `(γ, γ_aux, λ)` and the norms.
    fn map_token(&self, side: &Stream, b: usize, h: usize, n: usize, s: &mut DydilaScratch) -> ([f32; 3], Norms) {
        let idx = [b, h, n];
        let params = [load_scalar(side.gamma, &idx), load_scalar(side.gamma_aux, &idx), load_scalar(side.lambda, &idx)];
        let mut norms = [(0.0, 0.0); 2];
        for (j, view) in [side.z, side.z_aux].into_iter().enumerate() {
            view.load_row(&idx, &mut s.z[j]);
            norms[j] = power_row(&s.z[j], params[j], self.eps, &mut s.r[j], &mut s.ls[j], &mut s.p[j]);
        }
        (params, norms)
    }
}

impl FeatureMap for Dydila<'_> {
    type Scratch = DydilaScratch;

    fn scratch(&self) -> DydilaScratch {
        let row = || vec![0.0f32; self.head_dim()];
        DydilaScratch {
            z: [row(), row()],
            r: [row(), row()],
            ls: [row(), row()],
            p: [row(), row()],
            g: row(),
            dz: [row(), row()],
        }
    }

    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], s: &mut DydilaScratch) {
        let d = self.head_dim();
        let stream = &self.sides[side as usize];
        for (r, out) in dst[..rows.len * d].chunks_exact_mut(d).enumerate() {
            let ([_, _, lambda], [(n1, n2), (n1a, n2a)]) = self.map_token(stream, rows.b, rows.h, rows.n0 + r, s);
            let (c, ca) = (n1 / n2, lambda * n1a / n2a);
            for ((o, p), pa) in out.iter_mut().zip(&s.p[0]).zip(&s.p[1]) {
                *o = c * p - ca * pa;
            }
        }
    }

    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], s: &mut DydilaScratch) {
        let Some(all_grads) = &self.grads else { return };
        let (d, stream, out) = (self.head_dim(), &self.sides[side as usize], &all_grads[side as usize]);
        for (r, g) in grad[..rows.len * d].chunks_exact(d).enumerate() {
            let (n, (b, h)) = (rows.n0 + r, (rows.b, rows.h));
            let ([gamma, gamma_aux, lambda], [(n1, n2), (n1a, n2a)]) = self.map_token(stream, b, h, n, s);
            // dφ(z) = dẐ, dφ(z_aux) = −λ dẐ, dλ = −dẐ · φ(z_aux).
            let dlambda = -(n1a / n2a) * dot(g, &s.p[1]);
            s.g.iter_mut().zip(g).for_each(|(ga, x)| *ga = -lambda * x);
            let dgamma = power_row_grad(&s.z[0], g, gamma, &s.r[0], &s.ls[0], &s.p[0], n1, n2, &mut s.dz[0]);
            let dgamma_aux = power_row_grad(&s.z[1], &s.g, gamma_aux, &s.r[1], &s.ls[1], &s.p[1], n1a, n2a, &mut s.dz[1]);
            let idx = [b, h, n];
            out.dz.store_row(&idx, &s.dz[0]);
            out.dz_aux.store_row(&idx, &s.dz[1]);
            out.dgamma.store_f32(&idx, dgamma);
            out.dgamma_aux.store_f32(&idx, dgamma_aux);
            out.dlambda.store_f32(&idx, dlambda);
        }
    }
}
