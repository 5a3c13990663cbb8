"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) with a message
that starts with the argument's name and says what was expected.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKEND_NAMES = ("auto", "triton", "rust", "torch")
# Sizes and counts (grid sides, block sizes, top-K, levels, reach, ...) stay within int32, so a product of two of
# them fits in the int64 of the custom ops' schemas and of the kernels' index arithmetic.
MAX_INT = 2**31 - 1
# Scalars the kernels hold in float32 (scale, eps) must be normal float32 numbers, neither 0 nor inf once converted.
F32_TINY = torch.finfo(torch.float32).tiny
F32_MAX = torch.finfo(torch.float32).max


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int = MAX_INT) -> int:
    """An int (not a bool) within ``[minimum, maximum]`` (at most ``MAX_INT`` unless told otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    greater_than: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """A finite real number (not a bool) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if greater_than is not None and not value > greater_than:
        raise ValueError(f"{name} must be > {greater_than}, got {value}")
    if at_least is not None and value < at_least:
        raise ValueError(f"{name} must be >= {at_least}, got {value}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} must be <= {at_most}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices or (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_backend(backend: Any) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return check_choice("backend", backend, BACKEND_NAMES)


def check_tensor(name: str, x: Any, *, ndim: int) -> torch.Tensor:
    """A floating-point tensor (fp16, bf16, fp32, fp64) with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_tokens(x: Any, dim: int) -> tuple[int, int]:
    """A module's input ``x``: a floating-point tensor ``(B, N, dim)``; returns ``(B, N)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, N, dim={dim}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of shape (B, N, dim={dim}), got {x.dtype}")
    if x.dim() != 3 or x.shape[2] != dim:
        raise ValueError(f"x must have shape (B, N, dim) with dim = {dim}, got {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def check_same_kind(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` has the dtype and device of ``ref``."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_qkv(q: Any, k: Any, v: Any, *, cross: bool = False) -> tuple[int, int, int, int, int]:
    """Self-attention inputs ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)``; returns ``(B, H, N, D, Dv)``.

    With ``cross=True`` k and v may have another sequence length ``Nk`` than q (cross-attention): ``(B, H, Nk, D)``
    and ``(B, H, Nk, Dv)``; N is still q's.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_kind("k", k, "q", q)
    check_same_kind("v", v, "q", q)
    B, H, N, D = q.shape
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"k and v must have q's batch and heads (B, H) = {(B, H)}, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if cross and v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's sequence length Nk = {k.shape[2]}, got {v.shape[2]}")
    if not cross and (k.shape[2] != N or v.shape[2] != N):
        raise ValueError(
            f"k and v must have q's sequence length N = {N} (self-attention), "
            f"got k {k.shape[2]}, v {v.shape[2]}"
        )
    if k.shape[3] != D:
        raise ValueError(f"k must have q's head dim D = {D}, got {k.shape[3]}")
    if min(B, H, N, D, k.shape[2], v.shape[3]) == 0:
        raise ValueError(f"q, k, v must not be empty, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if max(B * H, N, k.shape[2], D, v.shape[3]) > MAX_INT:
        raise ValueError(
            f"q, k, v: B*H, N, Nk, D and Dv must each be <= {MAX_INT} (token and row indices are int32 in the kernels "
            f"and plans), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    return B, H, N, D, v.shape[3]


def resolve_scale(scale: Any, head_dim: int) -> float:
    """``scale`` or ``head_dim ** -0.5`` when None; must be positive and a normal float32 number (the kernels hold
    it in float32)."""
    if scale is None:
        return head_dim**-0.5
    return check_float("scale", scale, greater_than=0.0, at_least=F32_TINY, at_most=F32_MAX)
