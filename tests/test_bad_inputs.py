"""Every public argument is validated: bad input raises ValueError/TypeError naming the argument."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import difattn
from difattn import TokenGrid

GRID = TokenGrid(4, 6, text_tokens=3)  # N = 27
N = GRID.num_tokens


def qkv(n=N, d=8, dtype=torch.float32):
    return tuple(torch.randn(2, 2, n, d, dtype=dtype) for _ in range(3))


Q, K, V = qkv()
BHN = torch.rand(2, 2, N)
DYDILA = dict(gamma_q=1.0, gamma_k=1.0, gamma_q_aux=1.0, gamma_k_aux=1.0, lambda_q=0.1, lambda_k=0.1)


def clear(**kw):
    args = dict(q=Q, k=K, v=V, grid=GRID, radius=2.0) | kw
    return difattn.clear_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("grid"), **args)


def grat(**kw):
    args = dict(q=Q, k=K, v=V, grid=GRID) | kw
    return difattn.grat_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("grid"), **args)


def pisa(**kw):
    args = dict(q=Q, k=K, v=V, block_size=4) | kw
    return difattn.pisa_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def llsa(**kw):
    args = dict(q=Q, k=K, v=V, block_size=4, topk=2) | kw
    return difattn.llsa_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def dydila(**kw):
    args = dict(q=Q, k=K, v=V, q_aux=Q, k_aux=K) | DYDILA | kw
    tensors = [args.pop(n) for n in ("q", "k", "v", "q_aux", "k_aux")]
    return difattn.dydila_attention(*tensors, **args)


def linear(**kw):
    args = dict(q=Q, k=K, v=V) | kw
    return difattn.linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def nn_attention():
    return difattn.nn.Attention(32, 2, method="clear", radius=2.0)


def tiny_dit(**kw):
    from difattn.models.dit import DiT

    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, **kw)


CASES = [
    # --- TokenGrid
    ("grid height zero", lambda: TokenGrid(0, 4), ValueError, "height"),
    ("grid width negative", lambda: TokenGrid(4, -1), ValueError, "width"),
    ("grid frames zero", lambda: TokenGrid(4, 4, frames=0), ValueError, "frames"),
    ("grid text negative", lambda: TokenGrid(4, 4, text_tokens=-2), ValueError, "text_tokens"),
    ("grid height float", lambda: TokenGrid(4.0, 4), TypeError, "height"),
    ("grid width bool", lambda: TokenGrid(4, True), TypeError, "width"),
    ("grid text position", lambda: TokenGrid(4, 4, text_position="middle"), ValueError, "text_position"),
    # --- q, k, v (shared checks, exercised through several methods)
    ("q not a tensor", lambda: clear(q=Q.numpy()), TypeError, "q"),
    ("q 3-D", lambda: clear(q=Q[0]), ValueError, "q"),
    ("k 5-D", lambda: grat(k=K[None]), ValueError, "k"),
    ("v int dtype", lambda: linear(v=V.long()), TypeError, "v"),
    ("q int dtype", lambda: pisa(q=Q.int()), TypeError, "q"),
    ("k dtype differs", lambda: llsa(k=K.double()), TypeError, "k"),
    ("v dtype differs", lambda: clear(v=V.half()), TypeError, "v"),
    ("k batch differs", lambda: grat(k=K[:1]), ValueError, "k"),
    ("v heads differ", lambda: pisa(v=V[:, :1]), ValueError, "v"),
    ("k length differs", lambda: llsa(k=K[:, :, :-1]), ValueError, "k"),
    ("v length differs", lambda: linear(v=V[:, :, :-1]), ValueError, "v"),
    ("k head dim differs", lambda: clear(k=torch.randn(2, 2, N, 4)), ValueError, "k"),
    ("empty q", lambda: linear(q=Q[:, :, :0], k=K[:, :, :0], v=V[:, :, :0]), ValueError, "q"),
    ("scale negative", lambda: clear(scale=-1.0), ValueError, "scale"),
    ("scale nan", lambda: grat(scale=float("nan")), ValueError, "scale"),
    ("scale string", lambda: pisa(scale="0.1"), TypeError, "scale"),
    ("backend unknown", lambda: clear(backend="cuda"), ValueError, "backend"),
    ("backend not str", lambda: linear(backend=1), TypeError, "backend"),
    # --- CLEAR
    ("clear grid wrong type", lambda: clear(grid=(4, 6)), TypeError, "grid"),
    ("clear grid wrong N", lambda: clear(grid=TokenGrid(4, 6)), ValueError, "grid"),
    ("clear radius zero", lambda: clear(radius=0.0), ValueError, "radius"),
    ("clear radius negative", lambda: clear(radius=-3), ValueError, "radius"),
    ("clear radius inf", lambda: clear(radius=float("inf")), ValueError, "radius"),
    ("clear radius str", lambda: clear(radius="8"), TypeError, "radius"),
    ("clear temporal radius zero", lambda: clear(temporal_radius=0), ValueError, "temporal_radius"),
    ("clear global_kv not pair", lambda: clear(global_kv=K), TypeError, "global_kv"),
    ("clear global_kv wrong D", lambda: clear(global_kv=(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 8))), ValueError, "global_kv[0]"),
    ("clear global_kv G differs", lambda: clear(global_kv=(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 2, 8))), ValueError, "global_kv"),
    ("clear global_kv dtype", lambda: clear(global_kv=(torch.randn(2, 2, 3, 8).double(), torch.randn(2, 2, 3, 8))), TypeError, "global_kv[0]"),
    ("clear global_kv batch", lambda: clear(global_kv=(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))), ValueError, "global_kv[0]"),
    # --- GRAT
    ("grat group wrong length", lambda: grat(group=(2, 2, 2, 2)), TypeError, "group"),
    ("grat group zero", lambda: grat(group=(0, 4)), ValueError, "group[0]"),
    ("grat group float", lambda: grat(group=(2.5, 4)), TypeError, "group[0]"),
    ("grat group int", lambda: grat(group=4), TypeError, "group"),
    ("grat pattern", lambda: grat(pattern="cross"), ValueError, "pattern"),
    ("grat reach negative", lambda: grat(reach=-1), ValueError, "reach"),
    ("grat reach float", lambda: grat(reach=1.5), TypeError, "reach"),
    ("grat text_mask dtype", lambda: grat(text_mask=torch.ones(2, 3)), TypeError, "text_mask"),
    ("grat text_mask shape", lambda: grat(text_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "text_mask"),
    ("grat text_mask list", lambda: grat(text_mask=[[True] * 3] * 2), TypeError, "text_mask"),
    ("grat grid wrong N", lambda: grat(grid=TokenGrid(5, 6)), ValueError, "grid"),
    # --- PISA
    ("pisa density zero", lambda: pisa(density=0.0), ValueError, "density"),
    ("pisa density above one", lambda: pisa(density=1.5), ValueError, "density"),
    ("pisa density str", lambda: pisa(density="half"), TypeError, "density"),
    ("pisa block size zero", lambda: pisa(block_size=0), ValueError, "block_size"),
    ("pisa block size float", lambda: pisa(block_size=64.0), TypeError, "block_size"),
    ("pisa order", lambda: pisa(order="second"), ValueError, "order"),
    ("pisa routing_bias int", lambda: pisa(routing_bias=1), TypeError, "routing_bias"),
    ("pisa sink", lambda: pisa(sink="middle"), ValueError, "sink"),
    ("pisa grid wrong N", lambda: pisa(grid=TokenGrid(3, 3)), ValueError, "grid"),
    ("pisa grid wrong type", lambda: pisa(grid="4x6"), TypeError, "grid"),
    ("pisa untileable block", lambda: pisa(grid=GRID, block_size=7), ValueError, "block_size"),
    ("pisa return_blocks str", lambda: pisa(return_blocks="yes"), TypeError, "return_blocks"),
    # --- LLSA
    ("llsa block size one", lambda: llsa(block_size=1), ValueError, "block_size"),
    ("llsa topk zero", lambda: llsa(topk=0), ValueError, "topk"),
    ("llsa topk too large", lambda: llsa(topk=8), ValueError, "topk"),
    ("llsa topk tuple length", lambda: llsa(topk=(2, 2), levels=1), ValueError, "topk"),
    ("llsa topk tuple entry", lambda: llsa(topk=(2, 0), levels=2), ValueError, "topk[1]"),
    ("llsa fine topk above candidates", lambda: llsa(topk=(6, 1), levels=2), ValueError, "topk"),
    ("llsa levels zero", lambda: llsa(levels=0), ValueError, "levels"),
    ("llsa levels str", lambda: llsa(levels="2"), TypeError, "levels"),
    ("llsa grid wrong N", lambda: llsa(grid=TokenGrid(2, 2)), ValueError, "grid"),
    ("llsa return_indices int", lambda: llsa(return_indices=1), TypeError, "return_indices"),
    # --- DyDiLA
    ("dydila q_aux shape", lambda: dydila(q_aux=Q[:, :, :-1]), ValueError, "q_aux"),
    ("dydila k_aux dtype", lambda: dydila(k_aux=K.double()), TypeError, "k_aux"),
    ("dydila k_aux not tensor", lambda: dydila(k_aux=None), TypeError, "k_aux"),
    ("dydila gamma_q shape", lambda: dydila(gamma_q=torch.ones(2, 2)), ValueError, "gamma_q"),
    ("dydila gamma_k int tensor", lambda: dydila(gamma_k=torch.ones(2, 2, N, dtype=torch.long)), TypeError, "gamma_k"),
    ("dydila gamma_q_aux str", lambda: dydila(gamma_q_aux="2"), TypeError, "gamma_q_aux"),
    ("dydila gamma_k_aux nan", lambda: dydila(gamma_k_aux=float("nan")), ValueError, "gamma_k_aux"),
    ("dydila lambda_q shape", lambda: dydila(lambda_q=BHN[:, :, :-1]), ValueError, "lambda_q"),
    ("dydila lambda_k None", lambda: dydila(lambda_k=None), TypeError, "lambda_k"),
    ("dydila normalize int", lambda: dydila(normalize=1), TypeError, "normalize"),
    ("dydila eps zero", lambda: dydila(eps=0.0), ValueError, "eps"),
    # --- linear
    ("linear normalize str", lambda: linear(normalize="true"), TypeError, "normalize"),
    ("linear eps negative", lambda: linear(eps=-1e-6), ValueError, "eps"),
    # --- values that once gave an unclear message (a later check's, or a raw torch error): the text it must hold
    ("linear eps below float32", lambda: linear(eps=1e-300), ValueError, "eps must be >="),
    ("dydila eps below float32", lambda: dydila(eps=1e-300), ValueError, "eps must be >="),
    ("scale above float32", lambda: clear(scale=1e300), ValueError, "scale"),
    ("grat reach beyond int64", lambda: grat(reach=2**64), ValueError, "reach"),
    ("grat group beyond int32", lambda: grat(group=(2**40, 1)), ValueError, "group[0]"),
    ("pisa block size beyond int32", lambda: pisa(block_size=2**63), ValueError, "block_size"),
    ("llsa levels beyond one token", lambda: llsa(levels=9), ValueError, "levels must be <="),
    ("grid side beyond int32", lambda: TokenGrid(2**40, 1), ValueError, "height"),
    ("linear N beyond int32", lambda: linear(**{n: x[:1, :1, :1].expand(1, 1, 2**31, 8)
                                                 for n, x in zip("qkv", (Q, K, V))}), ValueError, "N"),
    ("nn.Attention 2-D x", lambda: nn_attention()(torch.randn(N, 32)), ValueError, "x must have shape"),
    ("nn.Attention int x", lambda: nn_attention()(torch.ones(1, N, 32, dtype=torch.long)), TypeError, "x"),
    ("nn.DyDiLA wrong width", lambda: difattn.nn.DyDiLA(64, 4)(torch.randn(1, 16, 32)), ValueError, "x"),
    ("DiT attention unknown", lambda: tiny_dit(attention="foo"), ValueError, "attention"),
]


def test_there_are_at_least_fifty_cases():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 50


@pytest.mark.parametrize("name, call, error, argument", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(name, call, error, argument):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert argument in str(info.value), f"message does not name {argument!r}: {info.value}"


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        difattn.clear_attention(Q, K, V, GRID, 2.0)
    with pytest.raises(TypeError):
        difattn.pisa_attention(Q, K, V, 0.5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("method", [clear, grat, pisa, llsa, dydila, linear], ids=lambda f: f.__name__)
def test_every_method_runs_on_meta_tensors(method, backend):
    """Fake tensors (torch.compile's tracing) need shapes without data: PISA read its block sizes with .item()."""
    q, k, v = (x.to("meta") for x in (Q, K, V))
    kw = dict(q=q, k=k, v=v, backend=backend)
    kw |= dict(q_aux=q, k_aux=k) if method is dydila else {}
    out = method(**kw)
    assert out.device.type == "meta" and out.shape == (2, 2, N, 8)
    if method is pisa:
        out, blocks = pisa(**kw, grid=GRID, return_blocks=True, routing_bias="key_variance")
        assert out.shape == (2, 2, N, 8) and blocks.device.type == "meta"
        assert pisa(**(kw | dict(k=k[:, :, :13], v=v[:, :, :13]))).shape == (2, 2, N, 8)  # cross-attention


def _run_capped(code: str, timeout: float = 120, **env_vars: str) -> str:
    """Runs ``code`` in a fresh interpreter (a hang, an abort or a memory limit stays there), with ``env_vars`` set;
    returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env_vars)
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              check=False, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not return within {timeout} s")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_clear_extreme_radii_give_the_clamped_mask(backend):
    """A radius beyond the grid is the whole grid, one below 1 the query alone: radius >= 3.04e9 hung the Rust
    kernels (r² near i64::MAX overflowed isqrt's loop), 1e300 raised OverflowError on torch and 1e-300 an error
    about max_d2."""
    out = _run_capped(f"""
        import sys, torch, difattn
        grid = difattn.TokenGrid(5, 7, frames=2, text_tokens=3)
        q, k, v = (torch.randn(1, 2, grid.num_tokens, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        run = lambda r, rt: difattn.clear_attention(q, k, v, grid, radius=r, temporal_radius=rt, backend="{backend}")
        whole, alone = run(8.0, 2.0), run(0.5, 0.5)
        for r in (3.03e9, 3.05e9, 4e9, 1e10, 1e300, sys.float_info.max):
            assert torch.equal(run(r, r), whole), r
        for r in (1e-300, 5e-324, 1e-3):
            assert torch.equal(run(r, r), alone), r
        print("ok")
    """)
    assert out.strip() == "ok"


def test_llsa_buffers_follow_the_sequence_not_the_block_size():
    """block_size 2**15 at N=72 allocated block_size² floats per thread (4 GiB: the process aborted with
    "memory allocation failed" under a memory limit); a call needing more memory than allowed raises MemoryError."""
    out = _run_capped("""
        import resource, torch, difattn
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 8192, 8, generator=gen) for _ in range(3))
        small = lambda n, **kw: difattn.llsa_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], backend="rust", **kw)
        want = difattn.llsa_attention(q[:, :, :72], k[:, :, :72], v[:, :, :72], block_size=2**15, topk=1,
                                      backend="torch")
        small(72, block_size=4, topk=1)  # the pool and the libraries are loaded before the limit
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**28, resource.RLIM_INFINITY))
        assert torch.allclose(small(72, block_size=2**15, topk=1), want, atol=1e-5)
        try:
            small(8192, block_size=4096, topk=2)  # 4096 x 8192 f32 logits per thread: 128 MiB each
        except MemoryError as e:
            print("MemoryError:", e)
    """)
    assert out.startswith("MemoryError: out of memory"), out


def test_linear_state_beyond_memory_raises_memory_error():
    """Linear attention's D x Dv state is allocated whatever N is: D = Dv = 2**15 needs 4 GiB per head even for
    4 tokens; the kernel's own partial sums aborted the process under a memory limit."""
    out = _run_capped("""
        import resource, torch, difattn
        q = torch.rand(1, 1, 4, 2**15)
        difattn.linear_attention(q[..., :8], q[..., :8], q[..., :8], backend="rust")  # pool and libraries loaded
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        # Room for the 4 GiB state torch allocates as an output, not for the kernel's partial sums besides.
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**32 + 2**28, resource.RLIM_INFINITY))
        try:
            difattn.linear_attention(q, q, q, backend="rust")
        except MemoryError as e:
            print("MemoryError:", e)
    """)
    assert out.startswith("MemoryError: out of memory"), out


def _limited(margin: str) -> str:
    """Code defining ``limited(run)``: ``run()`` under an address-space limit ``margin`` bytes above what the process
    uses; returns "ok", "ours" (our MemoryError "out of memory"), or "torch" (torch's allocator failed)."""
    return f"""
        import resource
        def limited(run):
            used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + {margin}, resource.RLIM_INFINITY))
            try:
                run()
                return "ok"
            except MemoryError as e:
                return "ours" if str(e).startswith("out of memory") else f"other: {{e}}"
            except RuntimeError as e:
                assert "memory" in str(e) or "allocate" in str(e), e
                return "torch"
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    """


# glibc: blocks from 64 KiB mapped (so under the limit), and no per-thread arenas (their reserved 64 MiB are address
# space the limit does not see).
_MALLOC = dict(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=1")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_clear_never_aborts_at_any_memory_limit(direction):
    """Every allocation of CLEAR's kernels is fallible: under an address-space limit swept from ample down to
    nothing, each call returns or raises MemoryError (RuntimeError naming memory where torch's allocator is the one
    that fails), and at some limits the kernels' own buffers are the ones that fail. With infallible buffers (the
    query tiles, the key groups, the per-task scratch) the process aborted ("memory allocation of … bytes failed";
    at 2^26 tokens on a 5.8 MB allocation). CLEAR's kernels call no GEMM library, whose per-call packing buffers
    (bounded by its cache blocking, not by the shapes) abort when they fail: the sweep is exact for CLEAR."""
    out = _run_capped(_limited("margin") + f"""
        import torch, difattn
        torch.set_num_threads(2)
        gen = torch.Generator().manual_seed(0)
        # 9216 tokens: the query tiles' list (100 KiB) is mapped
        q, k, v = (torch.randn(1, 2, 96 * 96, 16, generator=gen, requires_grad=True) for _ in range(3))
        call = lambda: difattn.clear_attention(q, k, v, difattn.TokenGrid(96, 96), radius=3.0, backend="rust")
        call().sum().backward()  # the pool and the libraries are loaded before the limit
        seen = set()
        for i in range(36):
            margin = int(2**24 * 0.8**i)
            if {direction == "backward"}:
                out = call()
                seen.add(limited(lambda: out.backward(torch.ones_like(out))))
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    seen.add(limited(call))
        print(" ".join(sorted(seen)))
    """, **_MALLOC)
    # The forward reads f32 keys in place and may allocate too little for our MemoryError to come first.
    assert not any(s.startswith("other") for s in out.split()), out
    assert direction == "forward" or "ours" in out.split(), out


# Per method: inputs and a call whose kernel buffers need far more than 32 MiB beyond what torch allocates for it,
# and the bytes torch allocates besides the output or the gradients (the linear kernels' D x Dv state).
_BEYOND_MEMORY = {
    # GRAT: key panels of >= 256 keys x D = 2^17 channels (128 MiB) for 16 tokens; backward: 8 blocks' rows of
    # 16 x 2^17 (64 MiB).
    "grat": ("q, k, v = (torch.randn(1, 1, 16, 2**17) for _ in range(3))",
             "difattn.grat_attention(q, k, v, difattn.TokenGrid(4, 4), backend='rust')", 0),
    # PISA: one block of 4096 tokens, its 4096 x 4096 logits (64 MiB).
    "pisa": ("q, k, v = (torch.randn(1, 1, 4096, 8) for _ in range(3))",
             "difattn.pisa_attention(q, k, v, block_size=4096, density=1.0, backend='rust')", 0),
    # LLSA: blocks of 4096, a block's logits against its 2 selected blocks (128 MiB).
    "llsa": ("q, k, v = (torch.randn(1, 1, 8192, 8) for _ in range(3))",
             "difattn.llsa_attention(q, k, v, block_size=4096, topk=2, backend='rust')", 0),
    # Linear attention and DyDiLA: D = Dv = 2^12, the D x Dv partial sums (64 MiB each) for 8 tokens.
    "linear": ("q, k, v = (torch.rand(1, 1, 8, 2**12) for _ in range(3))",
               "difattn.linear_attention(q, k, v, backend='rust')", 2**26),
    "dydila": ("q, k, v = (torch.rand(1, 1, 8, 2**12) for _ in range(3))",
               "difattn.dydila_attention(q, k, v, q, k, gamma_q=2.0, gamma_k=2.0, gamma_q_aux=1.0, gamma_k_aux=1.0, "
               "lambda_q=0.1, lambda_k=0.1, backend='rust')", 2**26),
}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("method", sorted(_BEYOND_MEMORY))
def test_kernel_buffers_beyond_memory_raise_memory_error(method, direction):
    """Buffers the kernels size by the call's shapes (block logits, key panels, D x Dv sums) are allocated fallibly:
    with 32 MiB to spare beyond what torch allocates for the call (its outputs, or the gradients), a call that needs
    64 MiB or more of them raises MemoryError "out of memory" instead of aborting the process."""
    inputs, call, state = _BEYOND_MEMORY[method]
    out = _run_capped(_limited("room") + f"""
        import torch, difattn
        torch.set_num_threads(2)
        torch.manual_seed(0)
        {inputs}
        for x in (q, k, v):
            x.requires_grad_(True)
        call = lambda: {call}
        call().sum().backward()  # the pool and the libraries are loaded before the limit
        if {direction == "backward"}:
            out = call()
            grads = sum(x.numel() for x in (q, k, v, out)) * 4  # dq, dk, dv and dout
            room = grads + {state} + 2**25
            print(limited(lambda: out.backward(torch.ones_like(out))))
        else:
            with torch.no_grad():
                kept = call()
            room = kept.numel() * 4 + {state} + 2**25
            del kept
            with torch.no_grad():
                print(limited(call))
    """, **_MALLOC)
    assert out.strip() == "ours", out


def test_one_thread_pool_whatever_thread_counts_were_used():
    """One rayon pool was kept per distinct torch.set_num_threads value: 148 idle difattn-* threads after 1-8,
    16, 32 and 64 threads."""
    out = _run_capped("""
        import os, time, torch, difattn
        q = torch.randn(1, 2, 27, 8)
        grid = difattn.TokenGrid(4, 6, text_tokens=3)
        for threads in (1, 2, 3, 4, 5, 6, 7, 8, 16, 3):
            torch.set_num_threads(threads)
            difattn.clear_attention(q, q, q, grid, radius=2.0, backend="rust")
        def ours():
            count = 0
            for task in os.listdir("/proc/self/task"):
                try:
                    count += open(f"/proc/self/task/{task}/comm").read().startswith("difattn-")
                except FileNotFoundError:  # a replaced pool's worker that just exited
                    pass
            return count

        for _ in range(200):  # a replaced pool's workers exit on their own, shortly after it is dropped
            if ours() <= 3:
                break
            time.sleep(0.05)
        print(ours())
    """)
    assert int(out) <= 3

