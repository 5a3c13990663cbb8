//! Where the feature rows `Q̂`, `K̂` of the linear core come from and where their gradients go: the inputs
//! themselves (`Plain`, linear attention) or the DyDiLA prologue (`Dydila`: power maps with per-token exponents
//! and the token differential), recomputed per block in the forward and in the backward.

use super::power::{power_row, power_row_grad};
use crate::cpu::vmath::dot;
use crate::cpu::view::{DType, View};

/// The two sides of the core: queries (read out) and keys (reduced into the state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Query = 0,
    Key = 1,
}

/// Rows `n0..n0 + len` of head `(b, h)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub b: usize,
    pub h: usize,
    pub n0: usize,
    pub len: usize,
}

/// A source of feature rows and a sink for their gradients.
pub trait FeatureMap: Sync {
    type Scratch: Send;

    /// Per-thread buffers for blocks of up to `rows` rows.
    fn scratch(&self, rows: usize) -> Self::Scratch;

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

    fn scratch(&self, _rows: usize) {}

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

/// Buffers of the two power maps (main and aux stream) of `slots` tokens. In the backward a slot per row of a
/// block keeps what `load` computed, so `store_grad` on the same rows does not map them again.
pub struct DydilaScratch {
    z: [Vec<f32>; 2],
    r: [Vec<f32>; 2],
    ls: [Vec<f32>; 2],
    p: [Vec<f32>; 2],
    params: Vec<[f32; 3]>,
    norms: Vec<Norms>,
    cached: Option<(Side, Rows)>,
    g: Vec<f32>,
    dz: [Vec<f32>; 2],
}

/// `(n1, n2)` of the two maps of one token.
type Norms = [(f32, f32); 2];

impl Dydila<'_> {
    fn head_dim(&self) -> usize {
        self.sides[0].z.shape[3]
    }

    /// Loads and maps the main and aux rows of token `n` into `slot`, with its `(γ, γ_aux, λ)` and norms.
    fn map_token(&self, side: &Stream, b: usize, h: usize, n: usize, slot: usize, s: &mut DydilaScratch) {
        let (d, idx) = (self.head_dim(), [b, h, n]);
        let rows = slot * d..(slot + 1) * d;
        let params = [load_scalar(side.gamma, &idx), load_scalar(side.gamma_aux, &idx), load_scalar(side.lambda, &idx)];
        for (j, view) in [side.z, side.z_aux].into_iter().enumerate() {
            view.load_row(&idx, &mut s.z[j][rows.clone()]);
            let (r, ls, p) = (&mut s.r[j][rows.clone()], &mut s.ls[j][rows.clone()], &mut s.p[j][rows.clone()]);
            s.norms[slot][j] = power_row(&s.z[j][rows.clone()], params[j], self.eps, r, ls, p);
        }
        s.params[slot] = params;
    }

    /// Maps `rows` of `side`: one slot per row when gradients follow, else slot 0 for every row.
    fn map_rows(&self, side: Side, rows: Rows, s: &mut DydilaScratch, mut each: impl FnMut(usize, usize, &mut DydilaScratch))
    {
        let keep = self.grads.is_some();
        for r in 0..rows.len {
            let slot = if keep { r } else { 0 };
            self.map_token(&self.sides[side as usize], rows.b, rows.h, rows.n0 + r, slot, s);
            each(r, slot, s);
        }
        s.cached = keep.then_some((side, rows));
    }
}

impl FeatureMap for Dydila<'_> {
    type Scratch = DydilaScratch;

    fn scratch(&self, rows: usize) -> DydilaScratch {
        let d = self.head_dim();
        let slots = if self.grads.is_some() { rows } else { 1 };
        let block = || vec![0.0f32; slots * d];
        DydilaScratch {
            z: [block(), block()],
            r: [block(), block()],
            ls: [block(), block()],
            p: [block(), block()],
            params: vec![[0.0; 3]; slots],
            norms: vec![[(0.0, 0.0); 2]; slots],
            cached: None,
            g: vec![0.0; d],
            dz: [vec![0.0; d], vec![0.0; d]],
        }
    }

    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], s: &mut DydilaScratch) {
        let d = self.head_dim();
        self.map_rows(side, rows, s, |r, slot, s| {
            let [(n1, n2), (n1a, n2a)] = s.norms[slot];
            let (c, ca) = (n1 / n2, s.params[slot][2] * n1a / n2a);
            let (p, pa) = (&s.p[0][slot * d..(slot + 1) * d], &s.p[1][slot * d..(slot + 1) * d]);
            for ((o, p), pa) in dst[r * d..(r + 1) * d].iter_mut().zip(p).zip(pa) {
                *o = c * p - ca * pa;
            }
        });
    }

    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], s: &mut DydilaScratch) {
        let Some(all_grads) = &self.grads else { return };
        if s.cached != Some((side, rows)) {
            self.map_rows(side, rows, s, |_, _, _| {});
        }
        let (d, out) = (self.head_dim(), &all_grads[side as usize]);
        for (r, g) in grad[..rows.len * d].chunks_exact(d).enumerate() {
            let [gamma, gamma_aux, lambda] = s.params[r];
            let [(n1, n2), (n1a, n2a)] = s.norms[r];
            let row = r * d..(r + 1) * d;
            // dφ(z) = dẐ, dφ(z_aux) = −λ dẐ, dλ = −dẐ · φ(z_aux).
            let dlambda = -(n1a / n2a) * dot(g, &s.p[1][row.clone()]);
            s.g.iter_mut().zip(g).for_each(|(ga, x)| *ga = -lambda * x);
            let parts = |j: usize| (&s.z[j][row.clone()], &s.r[j][row.clone()], &s.ls[j][row.clone()], &s.p[j][row.clone()]);
            let ((z, rr, ls, p), (za, ra, lsa, pa)) = (parts(0), parts(1));
            let (dz, dz_aux) = s.dz.split_at_mut(1);
            let dgamma = power_row_grad(z, g, gamma, rr, ls, p, n1, n2, &mut dz[0]);
            let dgamma_aux = power_row_grad(za, &s.g, gamma_aux, ra, lsa, pa, n1a, n2a, &mut dz_aux[0]);
            let idx = [rows.b, rows.h, rows.n0 + r];
            out.dz.store_row(&idx, &s.dz[0]);
            out.dz_aux.store_row(&idx, &s.dz[1]);
            out.dgamma.store_f32(&idx, dgamma);
            out.dgamma_aux.store_f32(&idx, dgamma_aux);
            out.dlambda.store_f32(&idx, dlambda);
        }
    }
}
