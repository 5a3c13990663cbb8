//! Helpers shared by the kernels' unit tests: contiguous views over test buffers, deterministic values, and runs
//! on every instruction-set level of the CPU.

use super::isa::{self, Isa};
use super::view::View;

/// Runs `f` once on every instruction-set level this CPU runs, each made the process's level in use (the kernels
/// read it at their entry): the callers take [`isa::TEST_LOCK`], so such tests run one at a time, and the default
/// comes back afterwards even when `f` panics. Levels the CPU lacks are compiled but cannot run here: each is
/// reported as skipped with the features it needs (`cargo test -- --nocapture` shows it).
pub fn on_every_isa(mut f: impl FnMut()) {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            isa::set(None).expect("the default level");
        }
    }
    let _lock = isa::TEST_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _restore = Restore;
    for level in isa::Level::ALL {
        match Isa::new(level) {
            Ok(_) => {
                isa::set(Some(level)).expect("a supported level");
                f();
            }
            // Not a failure: the level's code is compiled and is tested on a CPU that has it.
            Err(missing) => eprintln!("skipped on this CPU: {missing}"),
        }
    }
}

/// Row-major strides of `shape`, in elements.
pub fn contiguous_strides(shape: &[usize]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as i64;
    }
    strides
}

/// A contiguous view of `data` as `dtype` with `shape` (the caller keeps `data` alive and large enough).
pub fn view_of<T>(name: &'static str, data: &[T], dtype: &str, shape: &[usize]) -> View {
    View::new(name, data.as_ptr() as usize, dtype, shape.to_vec(), contiguous_strides(shape)).unwrap()
}

/// A contiguous f32 view of `data` with `shape`.
pub fn view(name: &'static str, data: &[f32], shape: &[usize]) -> View {
    view_of(name, data, "float32", shape)
}

/// A contiguous f32 view of `data` with `shape` that a kernel may write (its address comes from a mutable borrow).
pub fn view_mut(name: &'static str, data: &mut [f32], shape: &[usize]) -> View {
    View::new(name, data.as_mut_ptr() as usize, "float32", shape.to_vec(), contiguous_strides(shape)).unwrap()
}

/// The results of a naive f64 attention loop: forward `out`, `lse` and the gradients `dq`, `dk`, `dv`.
pub struct Naive {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Asserts `|got − want| <= tol · (1 + |want|)` elementwise (an infinite `want` must be met exactly).
pub fn close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let ok = if b.is_infinite() { *a as f64 == *b } else { (*a as f64 - b).abs() <= tol * (1.0 + b.abs()) };
        assert!(ok, "{name}[{i}]: {a} vs {b}");
    }
}

/// `n` deterministic values in about [-1.5, 1.5] from `seed`.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 3.0 - 1.5
        })
        .collect()
}
