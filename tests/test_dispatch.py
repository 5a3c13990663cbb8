"""The backend table: explicit backends explain why they cannot run; auto falls back to torch."""

import pytest
import torch

import difattn
from difattn import backends, reference
from difattn.testing import random_qkv

GRID = difattn.TokenGrid(4, 4, text_tokens=2)


def test_auto_on_cpu_runs_a_backend_and_matches_reference():
    q, k, v = random_qkv(1, 2, GRID.num_tokens, 8, seed=1)
    out = difattn.clear_attention(q, k, v, GRID, radius=2.0)
    torch.testing.assert_close(out, reference.clear_attention(q, k, v, GRID, radius=2.0, scale=8**-0.5))


def test_auto_prefers_rust_on_cpu_and_falls_back_to_torch():
    cpu = torch.device("cpu")
    for method in backends.METHODS:
        impl = backends.select(method, "auto", cpu)
        rust = backends.BACKENDS["rust"]
        expected = "rust" if rust.can_run(method, cpu)[0] else "torch"
        assert impl is backends.BACKENDS[expected].implementations[method]


def test_explicit_torch_backend_runs_every_method():
    for method in backends.METHODS:
        assert backends.BACKENDS["torch"].can_run(method, torch.device("cpu")) == (True, "")


@pytest.mark.parametrize("method", backends.METHODS)
def test_unbuilt_backend_raises_runtime_error_with_reason(method):
    for name in ("rust", "triton"):
        ok, reason = backends.BACKENDS[name].can_run(method, torch.device("cpu"))
        if ok:
            continue
        assert reason and name in reason
        with pytest.raises(RuntimeError, match=name):
            backends.select(method, name, torch.device("cpu"))


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = backends.BACKENDS["triton"].runtime_check(torch.device("cpu"))
    assert not ok and ("CUDA" in reason or "triton" in reason)


def test_rust_backend_rejects_cuda_tensors():
    ok, reason = backends.BACKENDS["rust"].runtime_check(torch.device("cuda"))
    assert not ok and "CPU" in reason


def test_availability_lists_every_backend():
    table = backends.availability("pisa", torch.device("cpu"))
    assert set(table) == {"torch", "rust", "triton"}
    assert table["torch"] == (True, "")


def test_import_works_without_triton_and_says_why_when_used():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, difattn\n"
        "from difattn import backends\n"
        "grid = difattn.TokenGrid(4, 4)\n"
        "q = torch.randn(1, 1, 16, 8)\n"
        "difattn.clear_attention(q, q, q, grid, radius=2.0)\n"
        "ok, why = backends.triton_status()\n"
        "assert not ok and 'triton' in why, why\n"
        "try:\n"
        "    difattn.clear_attention(q, q, q, grid, radius=2.0, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    assert 'triton' in str(err)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None and m == 'triton']\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_import_does_not_load_triton():
    import subprocess
    import sys

    code = "import sys, difattn; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_auto_sends_float64_to_the_reference():
    grid = difattn.TokenGrid(5, 6, text_tokens=2)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 8, dtype=torch.float64, seed=5)
    out = difattn.clear_attention(q, k, v, grid, radius=2.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.clear_attention(q, k, v, grid, radius=2.0, scale=8**-0.5))
    assert backends.select("grat", "auto", torch.device("cpu"), torch.float64) is backends.BACKENDS["torch"].implementations["grat"]
