//! A dedicated rayon pool per thread count, rebuilt after `fork` (the global pool deadlocks in a forked child).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The pools built so far, by `(process id, threads)`.
type Pools = Mutex<HashMap<(u32, usize), Arc<rayon::ThreadPool>>>;

static POOLS: OnceLock<Pools> = OnceLock::new();

/// The pool with `threads` workers for this process.
pub fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, String> {
    let threads = threads.max(1);
    let key = (std::process::id(), threads);
    let mut pools = POOLS.get_or_init(|| Mutex::new(HashMap::new())).lock().map_err(|_| "thread pool lock poisoned".to_string())?;
    // Pools of a parent process (before fork) have no threads here: forget them.
    pools.retain(|(pid, _), _| *pid == key.0);
    if let Some(p) = pools.get(&key) {
        return Ok(p.clone());
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("difattn-{i}"))
        .build()
        .map_err(|e| e.to_string())?;
    let built = Arc::new(built);
    pools.insert(key, built.clone());
    Ok(built)
}
