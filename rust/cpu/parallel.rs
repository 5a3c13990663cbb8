//! The kernels' parallel loops: a [`Team`] of `threads` workers (torch's intra-op thread count) runs tasks
//! `0..n`, each exactly once, handed out one at a time ([`Ranges`]): each worker owns a contiguous range of the
//! tasks and takes them in order, then helps the others from the back of theirs (so a worker that starts late,
//! or is slowed by other work on its core, takes fewer tasks, and neighbouring tasks, which kernels order to share
//! what they load, mostly stay with one worker).
//!
//! The workers are torch's own when torch's OpenMP runtime is loaded (`openmp`): the loop is an OpenMP parallel
//! region of that runtime, so the threads that just ran a torch op, and still spin waiting for the next one, pick
//! up the kernel's tasks at once instead of competing with a second set of threads for the cores. Without an
//! OpenMP runtime in the process (Rust-only use, `cargo test`), and in a process forked after the runtime was
//! found (GNU libgomp's threads do not survive `fork`: a region in the child waits for them forever), the
//! workers are a rayon pool ([`pool`](super::pool)) of `threads - 1` threads plus the calling thread. The
//! environment variable `DIFATTN_CPU_THREADS_RUNTIME` (`auto`, the default; `openmp`; `rayon`), read once, or
//! [`set_choice`] forces one.
//!
//! A loop started inside another (a worker's task that runs a loop) runs on the worker alone: no nested teams,
//! no waiting on busy workers. A panicking task becomes an error of the loop (never an unwind across the OpenMP
//! runtime), and the first error stops the hand-out of further tasks. Where the address space has no room for an
//! OpenMP team's thread stacks (under `RLIMIT_AS`; the runtime would end the process), the loop runs on the calling
//! thread alone.

mod openmp;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::ops::Range;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use super::common::OUT_OF_MEMORY;
use super::pool::pool;
use super::view::ViewError;

/// The environment variable that picks the runtime: `auto` (OpenMP where loaded, else rayon), `openmp`, `rayon`.
pub const ENV: &str = "DIFATTN_CPU_THREADS_RUNTIME";

/// The start of the message of a loop that failed for a reason other than its tasks' own errors (a panicking task,
/// a thread pool that could not start): the Python layer raises these as `RuntimeError`.
pub const FAILED: &str = "CPU threads failed";

/// Which runtime the loops use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// OpenMP when a runtime is loaded in this process (and it was found before any fork), else rayon.
    Auto,
    /// OpenMP; an error when no runtime is loaded (a forked child still uses rayon).
    OpenMp,
    /// The rayon pool.
    Rayon,
}

impl Choice {
    pub fn parse(name: &str) -> Option<Choice> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Choice::Auto),
            "openmp" => Some(Choice::OpenMp),
            "rayon" => Some(Choice::Rayon),
            _ => None,
        }
    }
}

/// The runtime a loop started now would run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    OpenMp,
    Rayon,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::OpenMp => "openmp",
            Runtime::Rayon => "rayon",
        }
    }
}

/// The choice made by [`set_choice`]: 0 = none (the environment's), else `1 + Choice as u8`.
static CHOSEN: AtomicU8 = AtomicU8::new(0);

fn env_choice() -> Result<Choice, String> {
    static FROM_ENV: OnceLock<Result<Choice, String>> = OnceLock::new();
    FROM_ENV
        .get_or_init(|| match std::env::var(ENV) {
            Err(_) => Ok(Choice::Auto),
            Ok(name) => Choice::parse(&name).ok_or_else(|| format!("{ENV}={name:?}: expected auto, openmp or rayon")),
        })
        .clone()
}

fn choice() -> Result<Choice, String> {
    match CHOSEN.load(Ordering::Relaxed) {
        1 => Ok(Choice::Auto),
        2 => Ok(Choice::OpenMp),
        3 => Ok(Choice::Rayon),
        _ => env_choice(),
    }
}

/// Makes `choice` the runtime choice of this process (`None`: back to the environment's); returns the runtime now
/// in use, or why it cannot be used (then nothing changes).
pub fn set_choice(choice: Option<Choice>) -> Result<Runtime, String> {
    let code = match choice {
        None => 0,
        Some(Choice::Auto) => 1,
        Some(Choice::OpenMp) => 2,
        Some(Choice::Rayon) => 3,
    };
    let previous = CHOSEN.swap(code, Ordering::Relaxed);
    let now = runtime();
    if now.is_err() {
        CHOSEN.store(previous, Ordering::Relaxed);
    }
    now
}

/// The OpenMP runtime the loops run on now, or None for rayon (an error for a bad `DIFATTN_CPU_THREADS_RUNTIME`, or
/// `openmp` without a loaded runtime).
fn openmp_in_use() -> Result<Option<&'static openmp::OpenMp>, String> {
    let loaded = openmp::runtime();
    match choice()? {
        Choice::Rayon => Ok(None),
        Choice::Auto => Ok(loaded.filter(|rt| rt.usable())),
        Choice::OpenMp => match loaded {
            Some(rt) => Ok(Some(rt).filter(|rt| rt.usable())),
            None => Err(format!("{ENV}=openmp, but no OpenMP runtime (libgomp, libiomp5, libomp) is loaded in this process")),
        },
    }
}

/// The runtime a loop started now runs on (an error for a bad `DIFATTN_CPU_THREADS_RUNTIME`, or `openmp` without
/// a loaded runtime).
pub fn runtime() -> Result<Runtime, String> {
    Ok(if openmp_in_use()?.is_some() { Runtime::OpenMp } else { Runtime::Rayon })
}

/// The file of the OpenMP runtime the loops use when they run on OpenMP (the first one loaded in the process), if
/// any is loaded.
pub fn openmp_library() -> Option<&'static str> {
    openmp::runtime().map(|rt| rt.path.as_str())
}

/// Finds the OpenMP runtime now (it is otherwise found at the first loop), so that a process forked after this
/// call knows it is a fork. The Python module calls it when it is imported.
pub fn find_openmp() {
    openmp::runtime();
}

thread_local! {
    /// Whether this thread is running tasks of a loop: a loop started then runs on this thread alone.
    static IN_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as a worker of a loop until dropped (restoring what it was, for loops run inline).
struct InLoop(bool);

impl InLoop {
    fn enter() -> InLoop {
        InLoop(IN_LOOP.with(|c| c.replace(true)))
    }
}

impl Drop for InLoop {
    fn drop(&mut self) {
        IN_LOOP.with(|c| c.set(self.0));
    }
}

/// The tasks `0..n` of a loop cut into one contiguous range per worker. A worker takes the first task of its own
/// range while it has one, then the last task of another range, staying with that range until it is empty (the
/// one with most tasks left first). Kernels order their tasks so that neighbours share inputs (the tiles of one
/// (batch, head) slice, whose keys a worker loads once): a single shared counter would hand neighbours to every
/// worker in turn and make each load every slice, where owned ranges have each slice loaded by about one worker.
struct Ranges {
    /// The tasks left in each range, `front..back`, taken at either end under the range's lock (held for a few
    /// instructions, never across a task).
    parts: Vec<Mutex<Range<usize>>>,
    /// Workers that have joined: the next one owns range `joined % parts.len()`.
    joined: AtomicUsize,
}

impl Ranges {
    fn new(tasks: usize, workers: usize) -> Result<Ranges, ViewError> {
        let mut parts = Vec::new();
        parts.try_reserve_exact(workers).map_err(|_| ViewError(format!("{OUT_OF_MEMORY}: cannot allocate {workers} task ranges")))?;
        // Range w is `w·tasks/workers .. (w+1)·tasks/workers`, computed without overflowing `w·tasks`.
        let (per, extra) = (tasks / workers, tasks % workers);
        let start = |w: usize| w * per + w.min(extra);
        parts.extend((0..workers).map(|w| Mutex::new(start(w)..start(w + 1))));
        Ok(Ranges { parts, joined: AtomicUsize::new(0) })
    }

    fn part(&self, i: usize) -> MutexGuard<'_, Range<usize>> {
        self.parts[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The range a joining worker owns.
    fn join(&self) -> usize {
        self.joined.fetch_add(1, Ordering::Relaxed) % self.parts.len()
    }

    /// The next task of the worker owning range `own` that last stole from range `victim`, if any (updating
    /// `victim`); `None` once every range is empty.
    fn take(&self, own: usize, victim: &mut Option<usize>) -> Option<usize> {
        if victim.is_none() {
            if let Some(task) = self.part(own).next() {
                return Some(task);
            }
        }
        if let Some(task) = victim.and_then(|v| self.part(v).next_back()) {
            return Some(task);
        }
        loop {
            let fullest = (0..self.parts.len()).max_by_key(|&i| self.part(i).len())?;
            // Another worker may empty it between the two locks: look again.
            if let Some(task) = self.part(fullest).next_back() {
                *victim = Some(fullest);
                return Some(task);
            }
            if (0..self.parts.len()).all(|i| self.part(i).is_empty()) {
                return None;
            }
        }
    }
}

/// The state the workers of one loop share.
struct Shared<'a, S> {
    ranges: Ranges,
    stop: AtomicBool,
    error: Mutex<Option<ViewError>>,
    init: &'a (dyn Fn() -> Result<S, ViewError> + Sync),
    body: &'a (dyn Fn(&mut S, usize) -> Result<(), ViewError> + Sync),
}

impl<S> Shared<'_, S> {
    /// One worker: takes tasks until none are left or one failed; never unwinds.
    fn worker(&self) {
        let _in_loop = InLoop::enter();
        let failure = match catch_unwind(AssertUnwindSafe(|| self.work())) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                ViewError(format!("{FAILED}: a task panicked: {what}"))
            }
        };
        self.stop.store(true, Ordering::Relaxed);
        let mut first = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(failure);
    }

    fn work(&self) -> Result<(), ViewError> {
        let mut scratch = None;
        let own = self.ranges.join();
        let mut victim = None;
        while !self.stop.load(Ordering::Relaxed) {
            let Some(task) = self.ranges.take(own, &mut victim) else {
                break;
            };
            let s = match &mut scratch {
                Some(s) => s,
                None => scratch.insert((self.init)()?),
            };
            (self.body)(s, task)?;
        }
        Ok(())
    }
}

/// A set of `threads` workers for the loops of one kernel call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Team {
    threads: usize,
}

impl Team {
    /// A team of `threads` workers (at least one), the caller included.
    pub fn new(threads: usize) -> Team {
        Team { threads: threads.max(1) }
    }

    pub fn threads(self) -> usize {
        self.threads
    }

    /// Runs `body(task)` for every task in `0..tasks`; the first error is returned.
    pub fn for_each(self, tasks: usize, body: impl Fn(usize) -> Result<(), ViewError> + Sync) -> Result<(), ViewError> {
        self.for_each_init(tasks, || Ok(()), |_, task| body(task))
    }

    /// Runs `body(scratch, task)` for every task in `0..tasks`, exactly once each; every worker that takes a task
    /// makes its `scratch` first with `init` (once). The first error (of `init`, of a task, or a panic) is
    /// returned, and no task starts after it.
    pub fn for_each_init<S>(
        self,
        tasks: usize,
        init: impl Fn() -> Result<S, ViewError> + Sync,
        body: impl Fn(&mut S, usize) -> Result<(), ViewError> + Sync,
    ) -> Result<(), ViewError> {
        if tasks == 0 {
            return Ok(());
        }
        let workers = self.threads.min(tasks);
        let shared = Shared {
            ranges: Ranges::new(tasks, workers)?,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            init: &init,
            body: &body,
        };
        let work = || shared.worker();
        // Checked even where the loop then runs inline: a bad choice is an error of every call, not of large ones.
        let openmp = openmp_in_use().map_err(ViewError)?;
        if workers == 1 || IN_LOOP.with(Cell::get) {
            work();
        } else if let Some(rt) = openmp {
            if rt.room_for_team(workers) {
                rt.parallel(workers, &work);
            } else {
                work();
            }
        } else {
            let pool = pool(workers - 1).map_err(|e| ViewError(format!("{FAILED}: thread pool: {e}")))?;
            pool.in_place_scope(|scope| {
                for _ in 1..workers {
                    scope.spawn(|_| work());
                }
                work();
            });
        }
        match shared.error.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `body(task)` for every task in `0..tasks`, in task order.
    pub fn map<T>(self, tasks: usize, body: impl Fn(usize) -> Result<T, ViewError> + Sync) -> Result<Vec<T>, ViewError>
    where
        T: Send,
    {
        self.map_init(tasks, || Ok(()), |_, task| body(task))
    }

    /// `body(scratch, task)` for every task in `0..tasks`, in task order (scratch as in [`Team::for_each_init`]).
    pub fn map_init<S, T>(
        self,
        tasks: usize,
        init: impl Fn() -> Result<S, ViewError> + Sync,
        body: impl Fn(&mut S, usize) -> Result<T, ViewError> + Sync,
    ) -> Result<Vec<T>, ViewError>
    where
        T: Send,
    {
        let mut slots: Vec<Option<T>> = Vec::new();
        slots.try_reserve_exact(tasks).map_err(|_| ViewError(format!("{OUT_OF_MEMORY}: cannot allocate {tasks} results")))?;
        slots.resize_with(tasks, || None);
        self.chunks_mut(&mut slots, 1, init, |s, task, slot| {
            slot[0] = Some(body(s, task)?);
            Ok(())
        })?;
        slots
            .into_iter()
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| ViewError(format!("{FAILED}: a task left no result")))
    }

    /// `body(scratch, i, chunk)` for every chunk of `data` (`chunk` elements, the last one shorter), `i` its
    /// index (scratch as in [`Team::for_each_init`]).
    pub fn chunks_mut<T, S>(
        self,
        data: &mut [T],
        chunk: usize,
        init: impl Fn() -> Result<S, ViewError> + Sync,
        body: impl Fn(&mut S, usize, &mut [T]) -> Result<(), ViewError> + Sync,
    ) -> Result<(), ViewError>
    where
        T: Send,
    {
        let parts = Chunks::new(data, chunk)?;
        self.for_each_init(parts.count, init, |s, i| {
            // SAFETY: `for_each_init` passes each index to one call only, so chunk `i` has no other borrower.
            body(s, i, unsafe { parts.get(i) })
        })
    }

    /// `body(scratch, i, a_i, b_i)` for the chunks `a_i` of `a` (`chunk_a` elements) and `b_i` of `b` (`chunk_b`)
    /// side by side, as many as the shorter list has.
    #[allow(clippy::too_many_arguments)]
    pub fn zip_chunks_mut<A, B, S>(
        self,
        (a, chunk_a): (&mut [A], usize),
        (b, chunk_b): (&mut [B], usize),
        init: impl Fn() -> Result<S, ViewError> + Sync,
        body: impl Fn(&mut S, usize, &mut [A], &mut [B]) -> Result<(), ViewError> + Sync,
    ) -> Result<(), ViewError>
    where
        A: Send,
        B: Send,
    {
        let (pa, pb) = (Chunks::new(a, chunk_a)?, Chunks::new(b, chunk_b)?);
        self.for_each_init(pa.count.min(pb.count), init, |s, i| {
            // SAFETY: as in `chunks_mut`: index `i` goes to this call alone.
            let (ca, cb) = unsafe { (pa.get(i), pb.get(i)) };
            body(s, i, ca, cb)
        })
    }
}

/// A slice cut into chunks that tasks borrow mutably, one task per chunk.
struct Chunks<T> {
    ptr: *mut T,
    len: usize,
    chunk: usize,
    count: usize,
}

// SAFETY: a `Chunks` is only read through `get`, whose callers hand each chunk to one thread at a time, and the
// elements may move between threads (`T: Send`): what `&mut [T]` split into `chunks_mut` allows.
unsafe impl<T: Send> Sync for Chunks<T> {}

impl<T> Chunks<T> {
    fn new(data: &mut [T], chunk: usize) -> Result<Chunks<T>, ViewError> {
        if chunk == 0 {
            return Err(ViewError(format!("{FAILED}: chunk size 0")));
        }
        Ok(Chunks { ptr: data.as_mut_ptr(), len: data.len(), chunk, count: data.len().div_ceil(chunk) })
    }

    /// Chunk `i` (`i < count`).
    ///
    /// # Safety
    /// No other reference to chunk `i` may live while the result does, and the slice `Chunks::new` was given must
    /// outlive it (the loops borrow it for their whole run).
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &mut [T] {
        assert!(i < self.count, "chunk {i} of {}", self.count);
        let start = i * self.chunk; // < len, since i < count = ceil(len / chunk)
        let end = start + (self.len - start).min(self.chunk);
        // SAFETY: `start..end` lies inside the slice (above), which is alive, and the caller guarantees that no other
        // reference to these elements exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}
