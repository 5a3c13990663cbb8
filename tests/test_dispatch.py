"""The backend table: one rule for every method. An explicit backend that cannot run a call raises RuntimeError
with the reason; auto runs the first preferred backend that can and otherwise the torch reference, logging why once."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import difattn
from difattn import backends, reference
from difattn.testing import random_qkv
from backend_cases import call_method

GRID = difattn.TokenGrid(4, 4, text_tokens=2)


def _call(method: str, dtype: torch.dtype, backend: str):
    """One small call of ``method`` through its public function."""
    return call_method(method, *random_qkv(1, 2, GRID.num_tokens, 8, dtype=dtype, seed=1), GRID, backend)


@pytest.mark.parametrize("method", backends.METHODS)
def test_explicit_rust_refuses_float64_with_the_reason(method):
    """Before the table knew dtypes, float64 with backend="rust" gave a ValueError (CLEAR, GRAT), a TypeError
    (LLSA) or ran the reference silently (PISA, linear, DyDiLA)."""
    with pytest.raises(RuntimeError, match=rf"{method}: backend='rust' cannot run this call: .*float64"):
        _call(method, torch.float64, "rust")


@pytest.mark.parametrize("method", backends.METHODS)
def test_explicit_triton_without_cuda_or_interpreter_raises_runtime_error(method, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CPU tensors on a machine with CUDA still need TRITON_INTERPRET; tested without CUDA")
    with pytest.raises(RuntimeError, match=rf"{method}: backend='triton' cannot run this call: .*CUDA"):
        _call(method, torch.float32, "triton")


@pytest.mark.parametrize("method", backends.METHODS)
def test_auto_runs_rust_for_float32_and_the_reference_for_float64(method):
    cpu = torch.device("cpu")
    assert backends.select(method, "auto", cpu, torch.float32) is backends.BACKENDS["rust"].implementations[method]
    assert backends.select(method, "auto", cpu, torch.float64) is backends.BACKENDS["torch"].implementations[method]
    assert _call(method, torch.float64, "auto").dtype == torch.float64


def test_auto_fallback_is_logged_once(caplog):
    backends._ANNOUNCED.discard(("clear", "rust: its kernels take float16, bfloat16, float32, got float64"))
    with caplog.at_level(logging.WARNING, logger="difattn"):
        for _ in range(3):
            _call("clear", torch.float64, "auto")
    messages = [r.getMessage() for r in caplog.records if "clear runs on the torch reference" in r.getMessage()]
    assert len(messages) == 1 and "float64" in messages[0]


def test_pisa_first_order_is_a_reference_only_option():
    q, k, v = random_qkv(1, 2, 16, 8, seed=3)
    ok, reason = backends.BACKENDS["rust"].can_run("pisa", torch.device("cpu"), torch.float32, {"order": "first"})
    assert not ok and "order='first'" in reason
    with pytest.raises(RuntimeError, match="order='first'"):
        difattn.pisa_attention(q, k, v, block_size=4, order="first", backend="rust")
    out = difattn.pisa_attention(q, k, v, block_size=4, order="first")
    torch.testing.assert_close(out, reference.pisa_attention(q, k, v, block_size=4, order="first", scale=8**-0.5))


def test_explicit_torch_backend_runs_every_method():
    for method in backends.METHODS:
        assert backends.BACKENDS["torch"].can_run(method, torch.device("cpu"), torch.float64) == (True, "")


def test_rust_backend_rejects_cuda_tensors():
    ok, reason = backends.BACKENDS["rust"].can_run("clear", torch.device("cuda"), torch.float32)
    assert not ok and "CPU" in reason


def test_availability_lists_every_backend():
    table = backends.availability("pisa", torch.device("cpu"))
    assert set(table) == {"torch", "rust", "triton"}
    assert table["torch"] == (True, "")


def test_import_works_without_triton_and_says_why_when_used():
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
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_import_does_not_load_triton():
    code = "import sys, difattn, difattn.cli; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_without_the_compiled_core_rust_raises_and_auto_runs_the_reference():
    """An unbuilt source checkout (difattn._core missing): backend="rust" raises RuntimeError naming the core,
    auto runs the reference for every method (and logs why), with the reference's values."""
    code = (
        "import sys; sys.modules['difattn._core'] = None\n"
        "import logging, torch, difattn\n"
        "from difattn import backends\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_dispatch import _call\n"
        "for method in backends.METHODS:\n"
        "    try:\n"
        "        _call(method, torch.float32, 'rust')\n"
        "    except RuntimeError as err:\n"
        "        assert 'compiled core' in str(err), err\n"
        "    else:\n"
        "        raise SystemExit(method + ': no error')\n"
        "    torch.testing.assert_close(_call(method, torch.float32, 'auto'), _call(method, torch.float32, 'torch'),\n"
        "                               rtol=0, atol=0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "runs on the torch reference" in done.stderr and "compiled core" in done.stderr
