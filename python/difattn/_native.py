"""Access to the compiled core, ``difattn._core``, with a helpful error when it is missing.

The import is tried once, when this module loads; the result lives in module globals (plain reads, which
torch.compile traces without the warnings a cached function would give).
"""

from __future__ import annotations

from types import ModuleType


def _import_core() -> tuple[ModuleType | None, str]:
    try:
        from . import _core
    except ImportError as err:  # a source checkout that was never built, or a broken wheel
        return None, f"the compiled core difattn._core cannot be imported ({err}); reinstall with `pip install .`"
    return _core, ""


_CORE, _REASON = _import_core()


def core_status() -> tuple[bool, str]:
    """``(available, reason_if_not)``."""
    return _CORE is not None, _REASON


def core() -> ModuleType:
    """The compiled core; raises ``RuntimeError`` saying how to get it when it is missing."""
    if _CORE is None:
        raise RuntimeError(_REASON)
    return _CORE
