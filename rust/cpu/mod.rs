//! CPU kernels. `view` checks raw tensor descriptors before any `unsafe` access; `matmul` is the GEMM front and
//! `vmath` the element-wise vector math; `common` holds what the kernels share (shapes, checks, gathers, the online softmax);
//! `lanes` the small products of 16 queries in the lanes of a vector (CLEAR's tiles, LLSA's fine blocks);
//! `parallel` runs their parallel loops (on torch's OpenMP threads, or on the rayon `pool`).
//!
//! The kernels: `block_attention` runs attention over block plans (GRAT, and CLEAR's plans when asked for them);
//! `clear` is CLEAR's own disc kernels (the CPU default), and `pisa`, `llsa` and `linear` (linear attention and
//! DyDiLA) have theirs. Each has a forward and a backward.

pub mod block_attention;
pub mod clear;
pub mod common;
pub mod isa;
pub mod lanes;
pub mod linear;
pub mod llsa;
pub mod matmul;
pub mod parallel;
pub mod pisa;
pub mod pool;
#[cfg(test)]
mod test_support;
pub mod view;
pub mod vmath;
