"""Test kit: the one tolerance helper, NaN poisoning, random inputs and hypothesis strategies.

The strategies live in :mod:`difattn.testing.strategies` (they need ``hypothesis``, a test extra).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "assert_close",
    "error_floor",
    "max_abs_error",
    "nan_poisoned",
    "assert_finite",
    "random_qkv",
    "rel_error",
    "compare_with_reference",
    "torch_threads",
]

# Absolute error floor per dtype, relative to the reference's magnitude (max(1, max|ref|)).
_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-4,
    torch.bfloat16: 2e-3,
}


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (NaN if either holds a NaN)."""
    diff = (a.detach().double() - b.detach().double()).abs()
    return float("nan") if diff.isnan().any() else float(diff.max()) if diff.numel() else 0.0


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (Frobenius norms)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def error_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """The small absolute floor added to the tolerance: ``_FLOOR[dtype] * max(1, max|ref|)``."""
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    return _FLOOR[dtype] * scale


def assert_close(
    name: str,
    fast: torch.Tensor,
    ref_low: torch.Tensor,
    ref_high: torch.Tensor,
    *,
    gradient: bool = False,
    factor: float | None = None,
) -> None:
    """The one tolerance rule of the project.

    ``fast`` is the output of the path under test, ``ref_low`` the reference run in the same (low) precision and
    ``ref_high`` the reference run in float64. Passes when::

        max|fast - ref_high| <= factor * max|ref_low - ref_high| + floor(dtype)

    with ``factor`` 2 for outputs and 3 for gradients (``gradient=True``), as flash-attention's tests do.
    """
    if fast.shape != ref_high.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference shape {tuple(ref_high.shape)}")
    if factor is None:
        factor = 3.0 if gradient else 2.0
    fast_err = max_abs_error(fast, ref_high)
    ref_err = max_abs_error(ref_low, ref_high)
    floor = error_floor(fast.dtype, ref_high)
    bound = factor * ref_err + floor
    if not fast_err <= bound:  # also catches NaN
        raise AssertionError(
            f"{name}: max error {fast_err:.3e} vs float64 reference exceeds {factor:g} x {ref_err:.3e} "
            f"(reference in {ref_low.dtype}) + floor {floor:.1e}"
        )


def nan_poisoned(shape, *, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh tensor full of NaN, for outputs a kernel must write completely."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def assert_finite(name: str, x: torch.Tensor) -> None:
    """Fail when ``x`` has a NaN or infinity (an unwritten or overflowed output)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} of {x.numel()} values are not finite")


def random_qkv(
    B: int,
    H: int,
    N: int,
    D: int,
    *,
    Dv: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
    token_major: bool = False,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(B, H, N, D)`` q, k and ``(B, H, N, Dv)`` v, never zeros.

    ``token_major=True`` returns ``(B, N, H, D)`` storage transposed to ``(B, H, N, D)`` (non-contiguous strides,
    as a model's projection produces them).
    """
    gen = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    out = []
    for d in (D, D, Dv):
        shape = (B, N, H, d) if token_major else (B, H, N, d)
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        x = x.transpose(1, 2) if token_major else x
        out.append(x.requires_grad_(requires_grad))
    return out[0], out[1], out[2]


def compare_with_reference(name: str, fast_fn, ref_fn, inputs, *, seed: int = 0) -> None:
    """Forward and every input gradient of ``fast_fn`` against ``ref_fn`` through :func:`assert_close`.

    ``inputs`` are tensors in the low precision under test; the reference runs once in that dtype and once in
    float64, with the same upstream gradient.
    """
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fast_fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, dout)
    refs = []
    for dtype in (inputs[0].dtype, torch.float64):
        ref_leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
        ref_out = ref_fn(*ref_leaves)
        refs.append((ref_out, torch.autograd.grad(ref_out, ref_leaves, dout.to(dtype))))
    (low, low_grads), (high, high_grads) = refs
    assert_close(f"{name} output", out, low, high)
    for i, (g, gl, gh) in enumerate(zip(grads, low_grads, high_grads)):
        assert_close(f"{name} grad of input {i}", g, gl, gh, gradient=True)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(threads)`` (the CPU kernels size their pools and pick their
    schedules from it), then restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
