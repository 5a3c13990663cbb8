"""The threads of the Rust kernels' parallel loops: torch's OpenMP threads (``openmp``, where torch loaded an OpenMP
runtime) or the core's rayon pool (``rayon``). Both give bitwise the same results at every thread count; a kernel
called from several Python threads at once, from inside an OpenMP parallel region, or in a process forked after use
finishes (each in a fresh process under a timeout, so a hang fails instead of stalling the suite); the choice
through ``DIFATTN_CPU_THREADS_RUNTIME`` and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backend_cases import call_method
from difattn import TokenGrid
from difattn._native import core, core_status
from difattn.testing import random_qkv, torch_threads

pytestmark = pytest.mark.skipif(not core_status()[0], reason="the compiled core is missing")

METHODS = ("clear", "grat", "pisa", "llsa", "linear", "dydila")
OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
PYTHONPATH = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(core().__file__)), os.path.dirname(__file__),
                                         os.environ.get("PYTHONPATH")) if p)


def _run(script: str, env: dict | None = None) -> str:
    """``script`` in a fresh interpreter (timeout: a hang fails the test); returns its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def runtimes():
    """The runtimes this process can use; the choice is restored after the test."""
    available = ["rayon"] + (["openmp"] if core().cpu_threads()[1] is not None else [])
    try:
        yield available
    finally:
        core().set_cpu_threads(None)


def _outputs(method: str) -> list[torch.Tensor]:
    grid = TokenGrid(9, 11, text_tokens=3)
    q, k, v = random_qkv(2, 3, grid.num_tokens, 16, seed=7, requires_grad=True)
    out = call_method(method, q, k, v, grid, "rust")
    out.backward(torch.ones_like(out) + out.detach())
    return [out.detach(), q.grad, k.grad, v.grad]


def test_torch_runtime_is_used_where_loaded(runtimes):
    runtime, library = core().cpu_threads()
    if OPENMP:
        assert (runtime, "openmp" in runtimes) == ("openmp", True) and "omp" in os.path.basename(library)
    assert core().set_cpu_threads("rayon") == "rayon" and core().cpu_threads()[0] == "rayon"
    with pytest.raises(ValueError, match='runtime: unknown "tbb"'):
        core().set_cpu_threads("tbb")
    assert core().cpu_threads()[0] == "rayon"


@pytest.mark.parametrize("method", METHODS)
def test_runtimes_agree_bitwise_at_every_thread_count(method, runtimes):
    """Each task writes its own rows and sums run in a fixed order: the runtime changes no bit, whatever the
    thread count (1, 2, and more threads than cores)."""
    for threads in (1, 2, 3):
        with torch_threads(threads):
            results = {}
            for runtime in runtimes:
                core().set_cpu_threads(runtime)
                results[runtime] = _outputs(method)
        for runtime, got in results.items():
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, results["rayon"]):
                assert torch.equal(a, b), f"{method} {name}: {runtime} differs from rayon at {threads} threads"


def test_rayon_can_be_forced_from_the_environment():
    out = _run("""
        from difattn._native import core
        print(core().cpu_threads()[0])
    """, env={"DIFATTN_CPU_THREADS_RUNTIME": "rayon"})
    assert out.split() == ["rayon"]


def test_a_bad_runtime_name_is_an_error_naming_the_variable():
    out = _run("""
        import torch, difattn
        from difattn.cli import main
        q = torch.rand(1, 1, 8, 4)
        try:
            difattn.linear_attention(q, q, q, backend="rust")
        except ValueError as err:
            print("raised:", err)
        main(["info"])
    """, env={"DIFATTN_CPU_THREADS_RUNTIME": "tbb"})
    assert "raised: DIFATTN_CPU_THREADS_RUNTIME=\"tbb\": expected auto, openmp or rayon" in out
    assert "CPU threads: error: DIFATTN_CPU_THREADS_RUNTIME" in out


SETUP = """
    import threading, torch
    from backend_cases import call_method
    from difattn import TokenGrid
    from difattn._native import core
    from difattn.testing import random_qkv
    grid = TokenGrid(12, 10, text_tokens=2)
    q, k, v = random_qkv(1, 4, grid.num_tokens, 16, seed=3)
    METHODS = ("clear", "grat", "pisa", "llsa", "linear", "dydila")
    def outputs():
        with torch.no_grad():
            return [call_method(m, q, k, v, grid, "rust") for m in METHODS]
    want = outputs()
    def same(got):
        return all(torch.equal(a, b) for a, b in zip(got, want))
"""


def test_several_python_threads_at_once_with_thread_count_changes():
    out = _run(SETUP + """
    print(core().cpu_threads()[0])
    results = []
    def work(i):
        for j in range(3):
            if i == 0:
                torch.set_num_threads(1 + j % 2)  # the count changes while the others run
            torch.randn(256, 256) @ torch.randn(256, 256)
            results.append(same(outputs()))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join(120)
    print(all(results), len(results), any(t.is_alive() for t in threads))
    """)
    runtime, ok, count, alive = out.split()
    assert (ok, count, alive) == ("True", "12", "False")
    assert runtime == ("openmp" if OPENMP else "rayon")


@pytest.mark.skipif(not OPENMP, reason="torch does not run on an OpenMP runtime here")
def test_called_from_inside_an_openmp_parallel_region():
    """Each thread of an OpenMP team (torch's runtime, through ctypes) calls the kernels: the nested loops run
    on the calling thread, no thread waits for another that is busy."""
    out = _run(SETUP + """
    import ctypes
    omp = ctypes.CDLL(core().cpu_threads()[1])
    results = []
    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def body(_):
        results.append(same(outputs()))
    omp.GOMP_parallel(body, None, 2, 0)
    print(results)
    """)
    assert out.strip() == "[True, True]"


def test_after_fork():
    """libgomp's threads do not survive fork (a region in the child would wait for them): a child forked after the
    kernels ran uses the rayon pool, and gives the same results. torch's own OpenMP ops hang in such a child, so
    the child runs torch on one thread (as DataLoader workers do) and the kernels on two."""
    out = _run(SETUP + """
    import os, signal
    print(core().cpu_threads()[0])
    pid = os.fork()
    if pid == 0:
        signal.alarm(120)
        torch.set_num_threads(1)
        torch.get_num_threads = lambda: 2  # what the launchers hand the kernels
        ok = same(outputs())
        os.write(1, f"child {core().cpu_threads()[0]} {ok}\\n".encode())
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    print("status", status, same(outputs()))
    """)
    lines = out.strip().splitlines()
    assert lines[0] == ("openmp" if OPENMP else "rayon")
    assert "child rayon True" in lines and lines[-1] == "status 0 True"


@pytest.mark.skipif(not OPENMP, reason="torch does not run on an OpenMP runtime here")
def test_a_team_without_room_for_its_stacks_runs_on_the_calling_thread():
    """Under an address-space limit with no room for a new thread's stack, a kernel whose OpenMP team needs a thread
    the runtime has not made yet (one thread before, two now) returns or raises MemoryError: libgomp ended the process
    ("Thread creation failed", exit status 1) when the team was started regardless."""
    out = _run("""
        import resource, torch, difattn
        torch.set_num_threads(1)
        q = torch.randn(1, 2, 96 * 96, 16)
        call = lambda: difattn.clear_attention(q, q, q, difattn.TokenGrid(96, 96), radius=3.0, backend="rust")
        expected = call()
        torch.set_num_threads(2)
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 4 * 2**20, resource.RLIM_INFINITY))
        try:
            out = call()
            # torch's own ops would start the two-thread team (and libgomp end the process): compare on one.
            torch.set_num_threads(1)
            print("ok" if torch.equal(out, expected) else "differs")
        except MemoryError as e:
            print("ours" if str(e).startswith("out of memory") else e)
    """, env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=1"})
    assert out.strip() in ("ok", "ours"), out
