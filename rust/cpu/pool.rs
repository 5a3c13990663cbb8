//! The rayon fallback of [`parallel`](super::parallel): one pool for the whole process, rebuilt when the thread
//! count changes and after `fork` (the global pool deadlocks in a forked child). Keeping one pool (not one per
//! thread count ever asked for) bounds the idle `difattn-*` threads by the current count.

use std::sync::{Arc, Mutex};

/// The pool and the `(process id, threads)` it was built for.
type Current = Mutex<Option<((u32, usize), Arc<rayon::ThreadPool>)>>;

static CURRENT: Current = Mutex::new(None);

/// The pool with `threads` workers for this process. A pool built for another count (or by the parent of a fork)
/// is replaced; calls still running on it keep their `Arc`, and its threads exit once the last one returns.
pub fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, String> {
    let key = (std::process::id(), threads.max(1));
    let mut current = CURRENT.lock().map_err(|_| "thread pool lock poisoned".to_string())?;
    if let Some((built_for, p)) = current.as_ref() {
        if *built_for == key {
            return Ok(p.clone());
        }
    }
    // Drop the old pool before building the new one, so at most one set of idle workers exists.
    *current = None;
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(key.1)
        .thread_name(|i| format!("difattn-{i}"))
        .build()
        .map_err(|e| e.to_string())?;
    let built = Arc::new(built);
    *current = Some((key, built.clone()));
    Ok(built)
}
