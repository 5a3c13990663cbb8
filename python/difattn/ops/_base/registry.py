"""The launcher registry: for each op and backend, the function that allocates the op's outputs and runs the
backend's kernels.

A custom op's body looks its launcher up by ``(op, backend)`` (``launcher("pisa_fwd", backend)(...)``), so no op
chooses a backend itself: the backend table (:mod:`difattn.backends`) chose it and passed its name down. Launchers
whose module needs an optional dependency (Triton) are registered by module path and imported on first use, so
``import difattn`` never imports triton.
"""

from __future__ import annotations

import importlib
from typing import Callable

_LAUNCHERS: dict[tuple[str, str], Callable | tuple[str, str]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` runs ``op`` on ``backend``."""

    def decorate(fn: Callable) -> Callable:
        _add(op, backend, fn)
        return fn

    return decorate


def register_lazy(op: str, backend: str, module: str, name: str) -> None:
    """``op`` on ``backend`` runs ``module.name``, imported when the op first runs there."""
    _add(op, backend, (module, name))


def launcher(op: str, backend: str) -> Callable:
    """The launcher of ``op`` on ``backend``; ``KeyError`` naming both when there is none."""
    try:
        entry = _LAUNCHERS[(op, backend)]
    except KeyError:
        raise KeyError(f"no launcher for op {op!r} on backend {backend!r}") from None
    if isinstance(entry, tuple):
        module, name = entry
        entry = getattr(importlib.import_module(module), name)
        _LAUNCHERS[(op, backend)] = entry
    return entry


def registered(op: str) -> tuple[str, ...]:
    """The backends that have a launcher for ``op``."""
    return tuple(backend for (name, backend) in _LAUNCHERS if name == op)


def _add(op: str, backend: str, entry: Callable | tuple[str, str]) -> None:
    if (op, backend) in _LAUNCHERS:
        raise ValueError(f"a launcher for op {op!r} on backend {backend!r} is already registered")
    _LAUNCHERS[(op, backend)] = entry
