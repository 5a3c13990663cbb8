//! The instruction-set level of the CPU kernels, seen from Python: what is in use and what this CPU has
//! (`difattn info`), and choosing a lower level for the process (the tests of every level, benchmarks).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::cpu::isa::{self, Isa, Level};

/// `(level in use, levels this CPU runs, CPU features)`; raises `ValueError` when `DIFATTN_CPU_ISA` asks for an
/// unknown level or one this CPU lacks.
#[pyfunction]
fn cpu_isa() -> PyResult<(&'static str, Vec<&'static str>, Vec<&'static str>)> {
    let active = Isa::active().map_err(PyValueError::new_err)?;
    let supported = Isa::supported().into_iter().map(|i| i.level().name()).collect();
    Ok((active.level().name(), supported, isa::cpu_features()))
}

/// Makes `level` (`"scalar"`, `"avx2"`, `"avx512"`, `"avx512bf16"`) the level of every CPU kernel in this
/// process, or with `None` goes back to `DIFATTN_CPU_ISA` / the best the CPU has; returns the level now in use.
/// Raises `ValueError` for an unknown level or one this CPU lacks.
#[pyfunction]
#[pyo3(signature = (level))]
fn set_cpu_isa(level: Option<&str>) -> PyResult<&'static str> {
    let level = match level {
        None => None,
        Some(name) => Some(Level::parse(name).ok_or_else(|| {
            PyValueError::new_err(format!("level: unknown CPU ISA {name:?}; expected one of scalar, avx2, avx512, avx512bf16"))
        })?),
    };
    let isa = isa::set(level).map_err(|e| PyValueError::new_err(format!("level: {e}")))?;
    Ok(isa.level().name())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_isa, m)?)?;
    Ok(())
}
