"""Run a compile test in a fresh Python process, so the compiled graph is traced before any op of the method ever
ran eagerly (an eager run first warms caches and registrations and can hide a trace that fails on its own)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_fresh(code: str, *, timeout: float = 600) -> None:
    """Runs ``code`` (dedented) with ``python -c`` in the test's environment; fails with its output unless it
    exits 0."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"fresh process failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
