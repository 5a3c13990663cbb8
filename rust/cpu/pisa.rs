//! PISA kernels on CPU.
