"""Access to the compiled core, ``difattn._core``, with a helpful error when it is missing.

The import is tried once, when this module loads; the result lives in module globals (plain reads, which
torch.compile traces without the warnings a cached function would give). When it fails, a ``RuntimeWarning``
says so once, naming the cause, because ``backend="auto"`` then quietly runs the CPU methods on the slow torch
reference instead of the Rust kernels.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

_BUILD = "build it with `pip install .` from a source checkout (needs a Rust toolchain: https://rustup.rs)"


def _import_core() -> tuple[ModuleType | None, str]:
    try:
        _core = importlib.import_module(f"{__package__}._core")
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == f"{__package__}._core":
            reason = f"the compiled core difattn._core is missing (a source tree that was never built?); {_BUILD}"
        else:  # present but broken: wrong platform, an incompatible libc, a truncated file
            reason = f"the compiled core difattn._core failed to import ({type(err).__name__}: {err}); {_BUILD}"
        warnings.warn(
            f"difattn: {reason}. Until then the CPU methods run on the slow torch reference backend.",
            RuntimeWarning,
            stacklevel=1,
        )
        return None, reason
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
