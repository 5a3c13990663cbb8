//! Where the feature rows `Q̂`, `K̂` of the linear core come from and where their gradients go: the inputs
//! themselves (`Plain`, linear attention) or the DyDiLA prologue (`Dydila`: power maps with per-token exponents
//! and the token differential), computed a block of tokens at a time in the forward and again in the backward.

use super::rows;
use super::power::{power_rows, power_rows_grad, reads_bf16, Input, Norms, Output};
use crate::cpu::common::{gather, zeros};
use crate::cpu::view::{View, ViewError};
use crate::cpu::vmath;

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

    /// Whether the forward's products (state and readout) may run in bf16 dot products for bf16 inputs
    /// (`matmul::Precision`): true where the features are the inputs as given. DyDiLA's features are powers `x^γ`
    /// of the inputs, whose bf16 rounding its exponents amplify: its γ and λ gradients then missed the bf16
    /// reference's accuracy by up to 20x (N = 1, D = 64), so its products stay f32.
    const BF16_PRODUCTS: bool;

    /// Per-thread buffers for blocks of up to `rows` rows.
    fn scratch(&self, rows: usize) -> Result<Self::Scratch, ViewError>;

    /// Writes the feature rows of `side` into `dst` (`rows.len x D`, row-major).
    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], scratch: &mut Self::Scratch);

    /// Back-propagates `grad` (`rows.len x D`: ∂L/∂ of the feature rows) to the inputs and writes their
    /// gradients.
    ///
    /// # Safety
    /// The caller must be the only writer of these rows, and the gradient views validated outputs.
    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], scratch: &mut Self::Scratch);
}

/// Rows per step of [`load_rows`]; before each step it asks for the rows `PREFETCH_ROWS` ahead (past the block,
/// where a task's next block usually starts), so they stream in from memory while it converts these: waiting for
/// them was most of the time the bf16 conversion took.
const LOAD_STEP: usize = 16;
const PREFETCH_ROWS: usize = 64;

/// Reads `rows` of a `(B, H, N, W)` view into `dst` (`rows.len x W`) as f32.
pub fn load_rows(view: &View, rows: Rows, dst: &mut [f32]) {
    let (n, w) = (view.shape()[2], view.shape()[3]);
    for s in (0..rows.len).step_by(LOAD_STEP) {
        let (n0, len) = (rows.n0 + s, (rows.len - s).min(LOAD_STEP));
        let ahead = n0 + PREFETCH_ROWS;
        if ahead < n {
            view.prefetch_rows(&[rows.b, rows.h, ahead], (n - ahead).min(LOAD_STEP));
        }
        // Consecutive bf16 rows convert in one call (a call per row cost a tenth of the conversion).
        match view.bf16_rows(&[rows.b, rows.h, n0], len) {
            Some(bits) => vmath::bf16_to_f32(bits, &mut dst[s * w..(s + len) * w]),
            None => gather(view, (rows.b, rows.h), n0..n0 + len, 1.0, &mut dst[s * w..]),
        }
    }
}

/// Rows `rows` of a `(B, H, N, W)` view in place, when it is f32 with consecutive rows (`rows.len x W` values);
/// `None` otherwise (read them with [`load_rows`]).
pub fn rows_in_place(view: &View, rows: Rows) -> Option<&[f32]> {
    view.f32_rows(&[rows.b, rows.h, rows.n0], rows.len)
}

/// Writes `src` (`rows.len x W`) to `rows` of a `(B, H, N, W)` output.
///
/// # Safety
/// As for [`View::store_row`], for these rows.
pub unsafe fn store_rows(view: &View, rows: Rows, src: &[f32]) {
    let w = view.shape()[3];
    // SAFETY: the caller owns these rows of the output (this function's contract) while `bits` lives.
    if let Some(bits) = unsafe { view.bf16_rows_mut(&[rows.b, rows.h, rows.n0], rows.len) } {
        // Consecutive bf16 rows convert in one call.
        return vmath::f32_to_bf16(&src[..rows.len * w], bits);
    }
    for (r, row) in src[..rows.len * w].chunks_exact(w).enumerate() {
        // SAFETY: the caller owns these rows of the output (this function's contract).
        unsafe { view.store_row(&[rows.b, rows.h, rows.n0 + r], row) };
    }
}

/// `rows` of a `(B, H, N, W)` input as the power maps read them: in place when they are consecutive f32 values, or
/// consecutive bf16 ones on a level that reads those (`power::reads_bf16`), else from `copy` (`rows.len x W`),
/// filled first when `fill` (a later call for the same rows finds them there).
fn power_input<'a>(view: &'a View, rows: Rows, copy: &'a mut [f32], fill: bool) -> Input<'a> {
    if let Some(z) = rows_in_place(view, rows) {
        return Input::F32(z);
    }
    if reads_bf16() {
        if let Some(z) = view.bf16_rows(&[rows.b, rows.h, rows.n0], rows.len) {
            return Input::Bf16(z);
        }
    }
    if fill {
        load_rows(view, rows, copy);
    }
    Input::F32(&copy[..rows.len * view.shape()[3]])
}

/// `rows` of a `(B, H, N, W)` output as the power maps' gradient writes them: in place when they are consecutive
/// f32 values, or consecutive bf16 ones on a level that writes those (`power::reads_bf16`), else into `buf`
/// (`rows.len x W`); the flag says whether they are written directly (if not, `store_rows` `buf` afterwards).
///
/// # Safety
/// As for [`View::store_row`], for these rows and for as long as the returned rows live.
unsafe fn power_output<'a>(view: &'a View, rows: Rows, buf: &'a mut [f32]) -> (Output<'a>, bool) {
    if reads_bf16() {
        // SAFETY: the caller owns these rows of the output while the slice lives (this function's contract).
        if let Some(bits) = unsafe { view.bf16_rows_mut(&[rows.b, rows.h, rows.n0], rows.len) } {
            return (Output::Bf16(bits), true);
        }
    }
    // SAFETY: as above.
    let (own, in_place) = unsafe { output_rows(view, rows, buf) };
    (Output::F32(own), in_place)
}

/// Rows of a validated contiguous `(B, H, N, W)` output to compute into (`rows.len x W`, row-major): the output
/// itself when it is f32, else `buf`; the flag says whether it is in place (if not, `store_rows` it afterwards).
///
/// # Safety
/// As for [`View::store_row`], for these rows and for as long as the returned slice lives.
pub unsafe fn output_rows<'a>(view: &'a View, rows: Rows, buf: &'a mut [f32]) -> (&'a mut [f32], bool) {
    // SAFETY: the caller owns these rows of the output while the slice lives (this function's contract).
    match unsafe { view.f32_rows_mut(&[rows.b, rows.h, rows.n0], rows.len) } {
        Some(own) => (own, true),
        None => (&mut buf[..rows.len * view.shape()[3]], false),
    }
}

/// Linear attention: the features are q and k as given.
pub struct Plain<'a> {
    pub inputs: [&'a View; 2],
    /// `[dq, dk]` in the backward.
    pub grads: Option<[&'a View; 2]>,
}

impl FeatureMap for Plain<'_> {
    const BF16_PRODUCTS: bool = true;
    type Scratch = ();

    fn scratch(&self, _rows: usize) -> Result<(), ViewError> {
        Ok(())
    }

    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], _: &mut ()) {
        load_rows(self.inputs[side as usize], rows, dst);
    }

    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], _: &mut ()) {
        if let Some(grads) = self.grads {
            // SAFETY: the caller owns these rows of the gradient outputs (`store_grad`'s contract).
            unsafe { store_rows(grads[side as usize], rows, grad) };
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

/// The two power maps (`[main, aux]` stream) of a block of tokens, kept from `load` to `store_grad` of the same
/// rows so the backward maps each block once. Row buffers are `rows x D`, per-token ones `rows`.
pub struct DydilaScratch {
    /// Copies of the input rows when they cannot be read in place (strided, or a dtype the level does not read).
    z: [Vec<f32>; 2],
    ls: [Vec<f32>; 2],
    p: [Vec<f32>; 2],
    gamma: [Vec<f32>; 2],
    lambda: Vec<f32>,
    norms: [Vec<Norms>; 2],
    /// The differential's coefficients per token: `(n1/n2, λ n1a/n2a)`.
    coefs: Vec<(f32, f32)>,
    cached: Option<(Side, Rows)>,
    /// Backward only (empty in the forward): `∂L/∂φ` of the aux map, `dz`, `dγ` per stream, `dλ`.
    g_aux: Vec<f32>,
    dz: [Vec<f32>; 2],
    dgamma: [Vec<f32>; 2],
    dlambda: Vec<f32>,
}

impl Dydila<'_> {
    fn head_dim(&self) -> usize {
        self.sides[0].z.shape()[3]
    }

    /// Loads `rows` of both streams of `side` with their `(γ, γ_aux, λ)` and maps them (power maps).
    fn map_rows(&self, side: Side, rows: Rows, s: &mut DydilaScratch) {
        let (st, len, d) = (&self.sides[side as usize], rows.len, self.head_dim());
        let lead = [rows.b, rows.h];
        st.gamma.load_span(&lead, rows.n0, &mut s.gamma[0][..len]);
        st.gamma_aux.load_span(&lead, rows.n0, &mut s.gamma[1][..len]);
        st.lambda.load_span(&lead, rows.n0, &mut s.lambda[..len]);
        for (j, view) in [st.z, st.z_aux].into_iter().enumerate() {
            let z = power_input(view, rows, &mut s.z[j], true);
            let (ls, p) = (&mut s.ls[j][..len * d], &mut s.p[j][..len * d]);
            power_rows(z, &s.gamma[j][..len], self.eps, ls, p, &mut s.norms[j][..len]);
        }
        s.cached = Some((side, rows));
    }

    /// `dλ = −dẐ · φ(z_aux)` and `∂L/∂φ(z_aux) = −λ dẐ` of every row of the block, from `grad = dẐ`.
    fn differential_grad(&self, len: usize, grad: &[f32], s: &mut DydilaScratch) {
        let d = self.head_dim();
        let (g_aux, dlambda) = (&mut s.g_aux[..len * d], &mut s.dlambda[..len]);
        rows::differential_grad(&grad[..len * d], &s.p[1][..len * d], &s.lambda[..len], g_aux, dlambda);
        // φ(z_aux) = (n1a / n2a) p_aux.
        dlambda.iter_mut().zip(&s.norms[1]).for_each(|(dl, &(n1a, n2a))| *dl *= -(n1a / n2a));
    }
}

/// Stores per-token values (`rows.len` of them) into a validated `(B, H, N)` output.
///
/// # Safety
/// As for [`View::store_row`], for these tokens.
unsafe fn store_tokens(view: &View, rows: Rows, src: &[f32]) {
    // SAFETY: the caller owns these tokens of the output (this function's contract).
    unsafe { view.store_span(&[rows.b, rows.h], rows.n0, &src[..rows.len]) };
}

impl FeatureMap for Dydila<'_> {
    const BF16_PRODUCTS: bool = false;
    type Scratch = DydilaScratch;

    fn scratch(&self, rows: usize) -> Result<DydilaScratch, ViewError> {
        let d = self.head_dim();
        let block = || zeros::<f32>(rows * d);
        let grad_rows = if self.grads.is_some() { rows } else { 0 };
        let grad_block = || zeros::<f32>(grad_rows * d);
        Ok(DydilaScratch {
            z: [block()?, block()?],
            ls: [block()?, block()?],
            p: [block()?, block()?],
            gamma: [zeros(rows)?, zeros(rows)?],
            lambda: zeros(rows)?,
            norms: [zeros(rows)?, zeros(rows)?],
            coefs: zeros(rows)?,
            cached: None,
            g_aux: grad_block()?,
            dz: [grad_block()?, grad_block()?],
            dgamma: [zeros(grad_rows)?, zeros(grad_rows)?],
            dlambda: zeros(grad_rows)?,
        })
    }

    fn load(&self, side: Side, rows: Rows, dst: &mut [f32], s: &mut DydilaScratch) {
        let (d, len) = (self.head_dim(), rows.len);
        self.map_rows(side, rows, s);
        // Ẑ = (n1/n2) p − λ (n1a/n2a) p_aux, the coefficients per token into `coefs`.
        let per_token = s.norms[0].iter().zip(&s.norms[1]).zip(&s.lambda);
        for (c, ((&(n1, n2), &(n1a, n2a)), &lambda)) in s.coefs.iter_mut().zip(per_token).take(len) {
            *c = (n1 / n2, lambda * n1a / n2a);
        }
        rows::differential(&s.p[0][..len * d], &s.p[1][..len * d], &s.coefs[..len], dst);
    }

    unsafe fn store_grad(&self, side: Side, rows: Rows, grad: &[f32], s: &mut DydilaScratch) {
        let Some(all_grads) = &self.grads else { return };
        if s.cached != Some((side, rows)) {
            self.map_rows(side, rows, s);
        }
        let (d, len, out) = (self.head_dim(), rows.len, &all_grads[side as usize]);
        // dφ(z) = dẐ, dφ(z_aux) = −λ dẐ, dλ = −dẐ · φ(z_aux).
        self.differential_grad(len, grad, s);
        let st = &self.sides[side as usize];
        let grad_views = [out.dz, out.dz_aux];
        for (j, (g, view)) in [(&grad[..len * d], st.z), (&s.g_aux[..len * d], st.z_aux)].into_iter().enumerate() {
            // The rows `map_rows` read: in place, or its copy.
            let z = power_input(view, rows, &mut s.z[j], false);
            let (ls, p, norms) = (&s.ls[j][..len * d], &s.p[j][..len * d], &s.norms[j][..len]);
            // SAFETY: the caller owns these rows of the gradient outputs (`store_grad`'s contract); the slice is
            // dropped at the end of this iteration.
            let (dz, direct) = unsafe { power_output(grad_views[j], rows, &mut s.dz[j]) };
            power_rows_grad(z, g, &s.gamma[j][..len], self.eps, ls, p, norms, dz, &mut s.dgamma[j][..len]);
            if !direct {
                // SAFETY: as above.
                unsafe { store_rows(grad_views[j], rows, &s.dz[j]) };
            }
        }
        // SAFETY: the caller owns these tokens of the gradient outputs (`store_grad`'s contract).
        unsafe {
            store_tokens(out.dgamma, rows, &s.dgamma[0]);
            store_tokens(out.dgamma_aux, rows, &s.dgamma[1]);
            store_tokens(out.dlambda, rows, &s.dlambda);
        }
    }
}
