//! Compiled core of difattn.
//!
//! `plan` is pure Rust (token geometry, permutations, block layouts) and knows nothing of Python;
//! `py` is the only module that touches PyO3 and is compiled only with the `python` feature.

pub mod cpu;
pub mod plan;

#[cfg(feature = "python")]
mod py;
