"""What a CPU-only or half-built install meets: no triton needed, and a missing or broken compiled core is said
once, with its cause, instead of a silent fall back to the torch reference."""

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this test run's import path, showing every warning; fails the test
    on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


RUN_EVERY_METHOD = """
    import torch, difattn
    g = difattn.TokenGrid(4, 6, text_tokens=2)
    q, k, v = (torch.randn(1, 2, g.num_tokens, 8) for _ in range(3))
    for backend in BACKENDS:
        difattn.clear_attention(q, k, v, g, radius=2.0, backend=backend)
        difattn.grat_attention(q, k, v, g, group=(2, 2), backend=backend)
        difattn.pisa_attention(q, k, v, density=0.5, block_size=4, backend=backend)
        difattn.llsa_attention(q, k, v, block_size=4, topk=2, backend=backend)
        difattn.linear_attention(q.relu(), k.relu(), v, backend=backend)
"""


def test_triton_is_optional():
    """Not a dependency (torch's CUDA wheels bring it; CPU-only torch does not), and without it difattn imports and
    runs every method on the Rust and torch backends."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("triton")]
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["triton"])
    done = _python(
        "import sys\nsys.modules['triton'] = None  # an environment without triton: importing it fails\n"
        + textwrap.dedent(RUN_EVERY_METHOD).replace("BACKENDS", "('rust', 'torch', 'auto')")
        + "from difattn.backends import triton_status\nprint(triton_status())\n"
    )
    assert "triton is not installed" in done.stdout


@pytest.mark.parametrize(
    "error, cause",
    [
        ("ModuleNotFoundError(\"No module named 'difattn._core'\", name='difattn._core')", "is missing"),
        ("ImportError('/site-packages/difattn/_core.abi3.so: undefined symbol: PyFoo')", "undefined symbol: PyFoo"),
    ],
    ids=["missing", "broken"],
)
def test_core_that_cannot_import_warns_once_with_its_cause(error, cause):
    done = _python(textwrap.dedent(f"""
        import importlib.abc, sys

        class NoCore(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "difattn._core":
                    raise {error}

        sys.meta_path.insert(0, NoCore())
    """) + textwrap.dedent(RUN_EVERY_METHOD).replace("BACKENDS", "('auto',)"))
    warned = [line for line in done.stderr.splitlines() if "RuntimeWarning: difattn: the compiled core" in line]
    assert len(warned) == 1 and cause in warned[0], done.stderr
