//! LLSA kernels on CPU.
