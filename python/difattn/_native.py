"""Access to the compiled core, ``difattn._core``, with a helpful error when it is missing."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def _import_core() -> tuple[ModuleType | None, str]:
    try:
        from . import _core
    except ImportError as err:  # a source checkout that was never built, or a broken wheel
        return None, f"the compiled core difattn._core cannot be imported ({err}); reinstall with `pip install .`"
    return _core, ""


def core_status() -> tuple[bool, str]:
    """``(available, reason_if_not)``."""
    core, reason = _import_core()
    return core is not None, reason


def core() -> ModuleType:
    """The compiled core; raises ``RuntimeError`` saying how to get it when it is missing."""
    module, reason = _import_core()
    if module is None:
        raise RuntimeError(reason)
    return module
