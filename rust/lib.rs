//! Compiled core of difattn.
//!
//! `plan` is pure Rust (token geometry, permutations, block layouts) and `cpu` holds the CPU kernels; neither knows
//! Python. `py` is the only module that touches PyO3 and is compiled only with the `python` feature.
//! `alloc` is the fallible allocation both use for every buffer sized by a call's shapes.

// Inside an `unsafe fn`, every unsafe operation still needs its own `unsafe` block (and its SAFETY comment).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod cpu;
pub mod plan;

#[cfg(feature = "python")]
mod py;
