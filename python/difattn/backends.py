"""The backend table: which implementation of a method runs for a call, and why the others cannot.

Each backend lists its implementations (one per method, all with the torch reference's signature) and answers
``can_run(method, device, dtype, options) -> (ok, reason)`` from the device, the build, the dtype and the method's
options. This table is the only place a backend is chosen: ``backend="auto"`` takes the first backend preferred
for the device (CUDA: triton; CPU: rust) that can run the call, and otherwise falls back to the torch reference,
saying why once through the ``difattn`` logger; an explicit backend that cannot run the call raises
``RuntimeError`` with the reason, the same way for every method.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import reference
from ._native import core_status
from .grid import TokenGrid
from .ops.block.plan import BlockPlan, block_plan, clear_plan_key, grat_plan_key, kernel_blocks
from .ops.clear import clear_on_blocks, clear_on_discs, computed_pairs_on_discs
from .ops.grat import grat_on_blocks
from .ops.linear import dydila_on_kernels, linear_on_kernels
from .ops.llsa import llsa_on_cpu, llsa_on_kernels
from .ops.pisa import pisa_on_kernels

METHODS = ("clear", "grat", "pisa", "llsa", "dydila", "linear")
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

logger = logging.getLogger("difattn")


def _find_triton() -> tuple[bool, str]:
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as err:  # ValueError: a stubbed-out sys.modules entry
        return False, f"triton cannot be imported ({err}); install triton>=3.4 on a Linux machine with CUDA"
    return found, "" if found else "triton is not installed; install triton>=3.4 on a Linux machine with CUDA"


# Looked up once, without importing triton (the triton launchers import it when the triton backend first runs); a
# plain module global, which torch.compile reads without tracing a cached function.
_TRITON_STATUS = _find_triton()


def triton_status() -> tuple[bool, str]:
    """Whether Triton is installed here, and why not."""
    return _TRITON_STATUS


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _no_limits(dtype: torch.dtype | None, options: dict[str, Any]) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    """One row of the table: a name, its implementations, the dtypes its kernels take, the device/build check and
    per-method limits on the options (each returns the reason it cannot run, or ``""``)."""

    name: str
    implementations: dict[str, Callable]
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    runtime_check: Callable[[torch.device], tuple[bool, str]] = lambda device: (True, "")
    limits: dict[str, Callable[[torch.dtype | None, dict[str, Any]], str]] = field(default_factory=dict)

    def can_run(self, method: str, device: torch.device, dtype: torch.dtype | None = None,
                options: dict[str, Any] | None = None) -> tuple[bool, str]:
        """Whether this backend runs ``method`` on ``device`` for ``dtype`` and ``options`` (None: not checked), and
        the reason when it cannot (without the backend's name, which callers put in front)."""
        if method not in self.implementations:
            return False, f"it does not implement {method}"
        ok, reason = self.runtime_check(device)
        if not ok:
            return False, reason
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return False, f"its kernels take {names}, got {str(dtype).removeprefix('torch.')}"
        reason = self.limits.get(method, _no_limits)(dtype, options or {})
        return not reason, reason


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


def _pisa_limits(dtype: torch.dtype | None, options: dict[str, Any]) -> str:
    if options.get("order") == "first":
        return ("the kernels implement the zeroth and hybrid orders; order='first' (per-block first-order terms, "
                "memory-bound) runs on backend='torch'")
    if options.get("cross"):
        return ("the kernels take one block layout for queries and keys; cross-attention (k and v with another "
                "length than q) runs on backend='torch'")
    return ""


def _triton_limits(inner: Callable[[torch.dtype | None, dict[str, Any]], str] = _no_limits):
    """A method's Triton limits: ``inner``'s, and bf16 under the interpreter, whose bf16 ``tl.dot`` is wrong."""

    def check(dtype: torch.dtype | None, options: dict[str, Any]) -> str:
        if dtype == torch.bfloat16 and triton_interpreting() and not torch.cuda.is_available():
            return "the Triton interpreter computes bf16 tl.dot wrongly (use float32/float16 under TRITON_INTERPRET=1)"
        return inner(dtype, options)

    return check


def _on(backend: str, fn: Callable) -> Callable:
    return functools.partial(fn, backend=backend)


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
    "rust": Backend(
        "rust",
        {
            "clear": clear_on_discs,
            "grat": _on("rust", grat_on_blocks),
            "pisa": _on("rust", pisa_on_kernels),
            "llsa": llsa_on_cpu,
            "dydila": _on("rust", dydila_on_kernels),
            "linear": _on("rust", linear_on_kernels),
        },
        dtypes=KERNEL_DTYPES,
        runtime_check=_rust_check,
        limits={"pisa": _pisa_limits},
    ),
    "triton": Backend(
        "triton",
        {
            "clear": _on("triton", clear_on_blocks),
            "grat": _on("triton", grat_on_blocks),
            "pisa": _on("triton", pisa_on_kernels),
            "llsa": _on("triton", llsa_on_kernels),
            "dydila": _on("triton", dydila_on_kernels),
            "linear": _on("triton", linear_on_kernels),
        },
        dtypes=KERNEL_DTYPES,
        runtime_check=_triton_check,
        limits={method: _triton_limits(_pisa_limits if method == "pisa" else _no_limits) for method in METHODS},
    ),
}

# Preferred order for backend="auto", by device type; torch always closes the list.
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("rust",)}

_ANNOUNCED: set[tuple[str, str]] = set()


def select(method: str, backend: str, device: torch.device, dtype: torch.dtype | None = None,
           options: dict[str, Any] | None = None) -> Callable:
    """The implementation of ``method`` for a call on ``device`` with ``dtype`` and ``options``.

    An explicit ``backend`` that cannot run the call raises ``RuntimeError`` with the reason; ``"auto"`` falls back
    to the torch reference when no preferred backend can, and logs why once per (method, reason).
    """
    if backend != "auto":
        ok, reason = BACKENDS[backend].can_run(method, device, dtype, options)
        if not ok:
            raise RuntimeError(f"{method}: backend={backend!r} cannot run this call: {reason}")
        return BACKENDS[backend].implementations[method]
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        ok, reason = BACKENDS[name].can_run(method, device, dtype, options)
        if ok:
            return BACKENDS[name].implementations[method]
        reasons.append(f"{name}: {reason}")
    _announce_fallback(method, "; ".join(reasons) or f"no fast backend runs on {device.type} tensors")
    return BACKENDS["torch"].implementations[method]


def _announce_fallback(method: str, reason: str) -> None:
    """Log once per (method, reason) that ``auto`` runs the torch reference (not while torch.compile traces: the
    eager call before it, or the first uncompiled one, says it)."""
    if torch.compiler.is_compiling() or (method, reason) in _ANNOUNCED:
        return
    _ANNOUNCED.add((method, reason))
    logger.warning("difattn: %s runs on the torch reference (backend='auto'): %s", method, reason)


def availability(method: str, device: torch.device) -> dict[str, tuple[bool, str]]:
    """``{backend: (can_run, reason)}`` for ``method`` on ``device`` for every dtype its kernels take (used by
    ``difattn info``)."""
    return {name: b.can_run(method, device) for name, b in BACKENDS.items()}


def block_plan_for(method: str, backend: str, grid: TokenGrid, head_dim: int,
                   options: dict[str, Any]) -> BlockPlan | None:
    """The block plan (on CPU) ``backend`` runs for a CLEAR or GRAT call on ``grid`` with heads of ``head_dim``, or
    None where the backend uses no block plan (CLEAR on Rust has its own disc kernels; the other methods).
    ``options`` are resolved (CLEAR: ``radius``, ``temporal_radius``; GRAT: ``group`` as ``(gt, gh, gw)``,
    ``pattern``, ``reach``)."""
    if method not in ("clear", "grat") or backend not in ("rust", "triton") or (method, backend) == ("clear", "rust"):
        return None
    blocks = kernel_blocks(backend, head_dim)
    if method == "clear":
        key = clear_plan_key(grid, options["radius"], options["temporal_radius"], 0, blocks)
    else:
        key = grat_plan_key(grid, options["group"], options["pattern"], options["reach"], False, blocks)
    return block_plan(key, torch.device("cpu"))


def computed_pairs(method: str, backend: str, grid: TokenGrid, head_dim: int, options: dict[str, Any]) -> int | None:
    """The (query, key) pairs ``backend``'s kernels compute for a CLEAR or GRAT call (every lane of CLEAR's CPU
    tiles over the union of their discs, or whole blocks of a block plan: at least the pairs the mask allows);
    None where they compute just the needed work. ``options`` as for :func:`block_plan_for`."""
    if (method, backend) == ("clear", "rust"):
        return computed_pairs_on_discs(grid, options["radius"], options["temporal_radius"])
    plan = block_plan_for(method, backend, grid, head_dim, options)
    return None if plan is None else plan.computed_pairs()
