//! PyO3 glue of the LLSA kernels.

use pyo3::prelude::*;

/// Adds this family's functions to `difattn._core`.
pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
