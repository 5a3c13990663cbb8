//! The OpenMP runtime already loaded in this process (torch's: GNU libgomp, or Intel's libiomp5 / LLVM's libomp,
//! which export the same `GOMP_*` entry points), found among the loaded shared objects and never loaded by us.

use std::ffi::{c_uint, c_void};
use std::sync::OnceLock;

/// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on a team of `num_threads` threads (the caller is
/// thread 0) and returns when all are done. In libgomp since GCC 4.9 (symbol version `GOMP_4.0`).
type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

pub struct OpenMp {
    parallel: ParallelFn,
    /// The runtime's file.
    pub path: String,
    /// The process that found it: its children (by `fork`) do not use it.
    pid: u32,
}

/// The first OpenMP runtime loaded in this process when first asked for (cached for good).
pub fn runtime() -> Option<&'static OpenMp> {
    static FOUND: OnceLock<Option<OpenMp>> = OnceLock::new();
    FOUND.get_or_init(find).as_ref()
}

impl OpenMp {
    /// Whether this process may start regions: not in a child forked after the runtime was found, where libgomp
    /// still counts the parent's threads as its own and a region would wait for them forever.
    pub fn usable(&self) -> bool {
        std::process::id() == self.pid
    }

    /// Whether the address space has room now for the stacks of a team of `threads` (the caller included). A
    /// runtime that cannot create a thread ends the process (libgomp: "Thread creation failed", exit status 1), so
    /// a loop checks first, and runs on the calling thread alone where there is no room (under an address-space
    /// limit, `RLIMIT_AS`). The check reserves and frees the stacks' address space; the runtime may still fail if
    /// other threads take that space in between, and threads it already has need no new stacks (the check does not
    /// know which it has: near the limit, a loop may run alone where its team would have fit).
    pub fn room_for_team(&self, threads: usize) -> bool {
        let Some(bytes) = (stack_bytes() + STACK_SLACK).checked_mul(threads.saturating_sub(1)) else {
            return false;
        };
        room_for(bytes)
    }

    /// Runs `work` once on each thread of a team of `threads` (the caller included) and returns when all are done.
    /// `work` must not unwind (an unwind out of the `extern "C"` trampoline aborts the process).
    pub fn parallel(&self, threads: usize, work: &(dyn Fn() + Sync)) {
        extern "C" fn trampoline(data: *mut c_void) {
            // SAFETY: `data` is the address of `work` below, a `&dyn Fn` that lives on the caller's stack until
            // `GOMP_parallel` returns, which is after every thread of the team has returned from here; `Sync` lets
            // the team's threads call it at once.
            let work = unsafe { &*(data as *const &(dyn Fn() + Sync)) };
            work();
        }
        let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
        let data: *const &(dyn Fn() + Sync) = &work;
        // SAFETY: `parallel` is the runtime's `GOMP_parallel` (resolved by name from the loaded runtime, which stays
        // loaded: `find` holds a reference to it), called with its C signature; `trampoline` does not unwind and
        // only reads `data`, which outlives the call (see above). Flags 0: no proc_bind request.
        unsafe { (self.parallel)(trampoline, data as *mut c_void, threads, 0) }
    }
}

/// Bytes a team thread needs besides its stack (guard page, thread-local storage, the runtime's own data).
const STACK_SLACK: usize = 1 << 20;

/// The stack size of the runtime's threads: `OMP_STACKSIZE`, else `GOMP_STACKSIZE` (a size with an optional unit B,
/// K, M or G; K when none, as libgomp reads them), else the soft `RLIMIT_STACK` (glibc's default for new threads),
/// else 8 MiB (a generous guess where that limit is unlimited).
fn stack_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| {
        ["OMP_STACKSIZE", "GOMP_STACKSIZE"]
            .iter()
            .find_map(|name| parse_stacksize(&std::env::var(name).ok()?))
            .or_else(stack_limit)
            .unwrap_or(8 << 20)
    })
}

/// `size[B|K|M|G]` (K when no unit) in bytes; None where it is not one.
fn parse_stacksize(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let size: usize = text[..digits].parse().ok()?;
    let shift = match text[digits..].trim().to_ascii_lowercase().as_str() {
        "b" => 0,
        "" | "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return None,
    };
    size.checked_mul(1 << shift)
}

#[cfg(target_os = "linux")]
fn stack_limit() -> Option<usize> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes one `rlimit` into `limit`, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok().filter(|&b| b > 0)
}

#[cfg(not(target_os = "linux"))]
fn stack_limit() -> Option<usize> {
    None
}

/// Whether `bytes` of address space can be mapped now (reserved without access, then freed at once). Without an
/// address-space limit (`RLIMIT_AS` unlimited, the usual case) there is nothing to check: no mapping is made.
#[cfg(target_os = "linux")]
fn room_for(bytes: usize) -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes one `rlimit` into `limit`, which lives across the call.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0 && limit.rlim_cur == libc::RLIM_INFINITY;
    if bytes == 0 || unlimited {
        return true;
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: an anonymous mapping at an address the kernel picks overlaps nothing that exists; without access
    // rights it is never read or written, and it is unmapped below with the length it was made with.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_NONE, flags, -1, 0);
        if p == libc::MAP_FAILED {
            return false;
        }
        libc::munmap(p, bytes);
    }
    true
}

#[cfg(not(target_os = "linux"))]
fn room_for(_: usize) -> bool {
    true
}

/// Whether a shared object's file name is an OpenMP runtime's.
fn is_openmp(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let named = |stem: &str| name.strip_prefix(stem).is_some_and(|rest| rest.starts_with(['.', '-']));
    named("libgomp") || named("libiomp5") || named("libomp")
}

fn find() -> Option<OpenMp> {
    let pid = std::process::id();
    loaded_objects().into_iter().filter(|p| is_openmp(p)).find_map(|path| {
        let parallel = lookup(&path)?;
        Some(OpenMp { parallel, path, pid })
    })
}

/// `GOMP_parallel` of the loaded object `path`.
#[cfg(target_os = "linux")]
fn lookup(path: &str) -> Option<ParallelFn> {
    let c_path = std::ffi::CString::new(path).ok()?;
    // SAFETY: `c_path` is NUL-terminated; with RTLD_NOLOAD, `dlopen` only returns a handle to an object already
    // loaded (null otherwise) and runs no initialiser. The handle's reference is kept: the runtime stays loaded.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: `handle` is a live handle and the name is NUL-terminated.
    let symbol = unsafe { libc::dlsym(handle, c"GOMP_parallel".as_ptr()) };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: `GOMP_parallel` has the C signature `ParallelFn` in libgomp's ABI, which libiomp5 and libomp
    // implement for GCC-compiled code; a non-null symbol of that name is that function.
    Some(unsafe { std::mem::transmute::<*mut c_void, ParallelFn>(symbol) })
}

#[cfg(not(target_os = "linux"))]
fn lookup(_: &str) -> Option<ParallelFn> {
    None
}

/// The files of the shared objects loaded in this process, in load order.
#[cfg(target_os = "linux")]
fn loaded_objects() -> Vec<String> {
    unsafe extern "C" fn collect(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> libc::c_int {
        // SAFETY: `data` is the `Vec` passed to `dl_iterate_phdr` below, borrowed by nothing else during the call;
        // `info` is valid during the callback, and `dlpi_name` is null or a NUL-terminated string.
        unsafe {
            let names = &mut *(data as *mut Vec<String>);
            let name = (*info).dlpi_name;
            if !name.is_null() {
                names.push(std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned());
            }
        }
        0
    }
    let mut names: Vec<String> = Vec::new();
    // SAFETY: `collect` matches the callback type, returns 0 (go on) and does not unwind; `names` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(collect), &mut names as *mut Vec<String> as *mut c_void) };
    names
}

#[cfg(not(target_os = "linux"))]
fn loaded_objects() -> Vec<String> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::{is_openmp, parse_stacksize};

    #[test]
    fn stack_sizes_are_read_as_libgomp_reads_them() {
        assert_eq!(parse_stacksize("512"), Some(512 << 10));
        assert_eq!(parse_stacksize(" 4M "), Some(4 << 20));
        assert_eq!(parse_stacksize("2g"), Some(2 << 30));
        assert_eq!(parse_stacksize("100B"), Some(100));
        assert_eq!(parse_stacksize("16k"), Some(16 << 10));
        for bad in ["", "M", "4X", "-1", "1.5M", "99999999999999999999"] {
            assert_eq!(parse_stacksize(bad), None, "{bad}");
        }
    }

    #[test]
    fn runtimes_are_recognised_by_file_name() {
        for name in ["/x/torch/lib/libgomp.so.1", "libgomp-a34b3233.so.1", "/opt/intel/libiomp5.so", "/usr/lib/libomp.so.5"] {
            assert!(is_openmp(name), "{name}");
        }
        for name in ["/usr/lib/libomptarget.so", "libgompx.so", "/libgomp/libc.so.6", ""] {
            assert!(!is_openmp(name), "{name}");
        }
    }
}
