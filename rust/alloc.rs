//! Fallible allocation. Every buffer whose size follows from a call's shapes is allocated here, so that a size the
//! machine cannot hold raises an error (`MemoryError` in Python) instead of aborting the process, as Rust's
//! infallible `vec!`, `collect` and `push` do ("memory allocation of … bytes failed").

use std::fmt;

/// What the message of a failed allocation starts with (the Python layer raises `MemoryError` for it).
pub const OUT_OF_MEMORY: &str = "out of memory";

/// A failed allocation, or a size that overflows `usize`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocError(pub String);

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AllocError {}

fn failed<T>(len: usize) -> AllocError {
    AllocError(format!("{OUT_OF_MEMORY}: cannot allocate {len} elements of {} bytes", std::mem::size_of::<T>()))
}

/// The product of `factors` (the length of a buffer), or an error where it overflows `usize`.
pub fn size(factors: &[usize]) -> Result<usize, AllocError> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| AllocError(format!("{OUT_OF_MEMORY}: a buffer of {factors:?} elements overflows the address space")))
}

/// An empty vector with room for `len` elements.
pub fn with_capacity<T>(len: usize) -> Result<Vec<T>, AllocError> {
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| failed::<T>(len))?;
    Ok(out)
}

/// `len` copies of `value`.
pub fn filled<T: Clone>(len: usize, value: T) -> Result<Vec<T>, AllocError> {
    let mut out = with_capacity(len)?;
    out.resize(len, value);
    Ok(out)
}

/// `len` default values (zeros for numbers).
pub fn zeros<T: Clone + Default>(len: usize) -> Result<Vec<T>, AllocError> {
    filled(len, T::default())
}

/// Appends `value`, growing the vector fallibly (amortised doubling, as `push`).
#[inline]
pub fn push<T>(out: &mut Vec<T>, value: T) -> Result<(), AllocError> {
    if out.len() == out.capacity() {
        out.try_reserve(1).map_err(|_| failed::<T>(out.len() + 1))?;
    }
    out.push(value);
    Ok(())
}

/// Resizes to `len`, filling new elements with `value`.
pub fn resize<T: Clone>(out: &mut Vec<T>, len: usize, value: T) -> Result<(), AllocError> {
    out.try_reserve(len.saturating_sub(out.len())).map_err(|_| failed::<T>(len))?;
    out.resize(len, value);
    Ok(())
}

/// Appends the items of `items` (reserving the iterator's lower size bound up front).
pub fn extend<T>(out: &mut Vec<T>, items: impl IntoIterator<Item = T>) -> Result<(), AllocError> {
    let items = items.into_iter();
    let lower = items.size_hint().0;
    out.try_reserve(lower).map_err(|_| failed::<T>(out.len().saturating_add(lower)))?;
    for x in items {
        push(out, x)?;
    }
    Ok(())
}

/// The items of `items` in a vector.
pub fn collect<T>(items: impl IntoIterator<Item = T>) -> Result<Vec<T>, AllocError> {
    let mut out = Vec::new();
    extend(&mut out, items)?;
    Ok(out)
}

/// A copy of `items`.
pub fn copy<T: Clone>(items: &[T]) -> Result<Vec<T>, AllocError> {
    let mut out = with_capacity(items.len())?;
    out.extend_from_slice(items);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_memory_are_errors_not_aborts() {
        let err = zeros::<f32>(usize::MAX / 8).unwrap_err();
        assert!(err.0.starts_with(OUT_OF_MEMORY), "{err}");
        assert!(filled(isize::MAX as usize / 2, 0u8).is_err());
        assert!(size(&[usize::MAX, 2]).unwrap_err().0.starts_with(OUT_OF_MEMORY));
        assert_eq!(size(&[3, 4, 5]), Ok(60));
        assert_eq!(size(&[]), Ok(1));
    }

    #[test]
    fn growing_helpers_keep_values() {
        let mut v = Vec::new();
        for i in 0..100 {
            push(&mut v, i).unwrap();
        }
        assert_eq!(v, (0..100).collect::<Vec<_>>());
        assert_eq!(collect((0..10).filter(|x| x % 2 == 0)).unwrap(), [0, 2, 4, 6, 8]);
        resize(&mut v, 3, 0).unwrap();
        resize(&mut v, 5, 7).unwrap();
        assert_eq!(v, [0, 1, 2, 7, 7]);
        assert_eq!(copy(&v[1..3]).unwrap(), [1, 2]);
    }
}
