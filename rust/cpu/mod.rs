//! CPU kernels. `view` checks raw tensor descriptors before any `unsafe` read; `simd` is the GEMM front and
//! `vmath` the element-wise vector math; `block_attention` is the one attention engine over block plans (forward
//! and backward).

pub mod block_attention;
pub mod clear;
pub mod linear;
pub mod llsa;
pub mod pisa;
pub mod pool;
pub mod simd;
#[cfg(test)]
mod test_support;
pub mod view;
pub mod vmath;
