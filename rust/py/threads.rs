//! The runtime of the CPU kernels' parallel loops, seen from Python: which one is in use (`difattn info`), and
//! choosing one for the process (tests of both runtimes, benchmarks).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::cpu::parallel::{self, Choice};

/// `(runtime in use, file of the loaded OpenMP runtime or None)`: "openmp" (torch's OpenMP threads) or "rayon";
/// raises `ValueError` when `DIFATTN_CPU_THREADS_RUNTIME` is not one of auto, openmp, rayon, or asks for openmp
/// where none is loaded (every CPU kernel call raises the same).
#[pyfunction]
fn cpu_threads() -> PyResult<(&'static str, Option<&'static str>)> {
    let runtime = parallel::runtime().map_err(PyValueError::new_err)?;
    Ok((runtime.name(), parallel::openmp_library()))
}

/// Makes `runtime` (`"auto"`, `"openmp"`, `"rayon"`) the runtime of every CPU kernel's loops in this process, or
/// with `None` goes back to `DIFATTN_CPU_THREADS_RUNTIME` / auto; returns the runtime now in use. Raises
/// `ValueError` for an unknown name, or openmp where no OpenMP runtime is loaded (the choice is then unchanged).
#[pyfunction]
#[pyo3(signature = (runtime))]
fn set_cpu_threads(runtime: Option<&str>) -> PyResult<&'static str> {
    let choice = match runtime {
        None => None,
        Some(name) => Some(Choice::parse(name).ok_or_else(|| {
            PyValueError::new_err(format!("runtime: unknown {name:?}; expected one of auto, openmp, rayon"))
        })?),
    };
    Ok(parallel::set_choice(choice).map_err(PyValueError::new_err)?.name())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Found now, at import (torch, imported first, has loaded its runtime): a process forked later knows it is a
    // fork and leaves the runtime alone.
    parallel::find_openmp();
    m.add_function(wrap_pyfunction!(cpu_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_threads, m)?)?;
    Ok(())
}
