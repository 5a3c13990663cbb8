"""The backend table: which implementation of a method runs for given tensors.

Each backend lists the methods it implements and answers ``can_run(method, tensors) -> (ok, reason)``.
``backend="auto"`` tries the backends preferred for the tensors' device in order (CUDA: triton; CPU: rust) and
falls back to the torch reference; an explicit backend that cannot run raises ``RuntimeError`` with its reason.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .ops import clear as clear_ops
from .ops import grat as grat_ops
from .ops import linear as linear_ops
from .ops import llsa as llsa_ops
from .ops import pisa as pisa_ops
from ._native import core_status

METHODS = ("clear", "grat", "pisa", "llsa", "dydila", "linear")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """Whether Triton can be imported here, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err}); install triton>=3.4 on a Linux machine with CUDA"
    return True, ""


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Backend:
    """One row of the table: a name, its implementations and the device/build checks it needs."""

    name: str
    implementations: dict[str, Callable] = field(default_factory=dict)
    runtime_check: Callable[[torch.device], tuple[bool, str]] = lambda device: (True, "")

    def can_run(self, method: str, device: torch.device) -> tuple[bool, str]:
        ok, reason = self.runtime_check(device)
        if not ok:
            return False, f"the {self.name} backend cannot run: {reason}"
        if method not in self.implementations:
            return False, f"the {self.name} backend does not implement {method} yet"
        return True, ""


def _rust_check(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"it runs on CPU tensors, got tensors on {device}"
    return core_status()


def _triton_check(device: torch.device) -> tuple[bool, str]:
    ok, reason = triton_status()
    if not ok:
        return False, reason
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return False, f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"
    return True, ""


# The block engine's methods, bound to the kernels of one backend.
_ENGINE = {"clear": clear_ops.clear_attention, "grat": grat_ops.grat_attention}


def _engine_on(kernel: str) -> dict[str, Callable]:
    return {method: functools.partial(fn, kernel=kernel) for method, fn in _ENGINE.items()}


BACKENDS: dict[str, Backend] = {
    "torch": Backend(
        "torch",
        {
            "clear": reference.clear_attention,
            "grat": reference.grat_attention,
            "pisa": reference.pisa_attention,
            "llsa": reference.llsa_attention,
            "dydila": reference.dydila_attention,
            "linear": reference.linear_attention,
        },
    ),
    "rust": Backend("rust", {**_engine_on("rust"), **linear_ops.implementations("rust"),
                            "pisa": functools.partial(pisa_ops.pisa_attention, kernel="rust"),
                            "llsa": functools.partial(llsa_ops.llsa_attention, kernel="rust")}, _rust_check),
    "triton": Backend("triton", {**_engine_on("triton"), **linear_ops.implementations("triton"),
                                "pisa": functools.partial(pisa_ops.pisa_attention, kernel="triton"),
                                "llsa": functools.partial(llsa_ops.llsa_attention, kernel="triton")}, _triton_check),
}

# Preferred order for backend="auto", by device type; torch always closes the list.
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("rust",)}


def select(method: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> Callable:
    """The implementation of ``method`` to run for tensors on ``device``. The compiled kernels compute in fp32
    from fp32/fp16/bf16 inputs, so ``auto`` sends float64 to the torch reference."""
    if backend == "auto" and dtype == torch.float64:
        backend = "torch"
    if backend != "auto":
        ok, reason = BACKENDS[backend].can_run(method, device)
        if not ok:
            raise RuntimeError(f"{method}: backend={backend!r} is unavailable: {reason}")
        return BACKENDS[backend].implementations[method]
    for name in AUTO_ORDER.get(device.type, ()) + ("torch",):
        if BACKENDS[name].can_run(method, device)[0]:
            return BACKENDS[name].implementations[method]
    raise RuntimeError(f"{method}: no backend can run on {device}")  # unreachable: torch runs anywhere


def availability(method: str, device: torch.device) -> dict[str, tuple[bool, str]]:
    """``{backend: (can_run, reason)}`` for ``method`` on ``device`` (used by ``difattn info``)."""
    return {name: b.can_run(method, device) for name, b in BACKENDS.items()}
