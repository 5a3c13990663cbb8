"""Linear attention and DyDiLA on the fast backends (arguments validated by the public functions)."""

from __future__ import annotations

import torch

from .op import PER_TOKEN, dydila_fwd, linear_attention_fwd

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _per_token(value: torch.Tensor | float, side: torch.Tensor) -> torch.Tensor:
    """A ``(B, H, n)`` tensor over the tokens of ``side`` (q or k) the kernels read: floats expand (stride 0),
    float64 tensors become fp32."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype in _KERNEL_DTYPES else value.float()
    return torch.full((1, 1, 1), float(value), dtype=torch.float32, device=side.device).expand(side.shape[:3])


def linear_on_kernels(q, k, v, *, normalize: bool, eps: float, backend: str) -> torch.Tensor:
    """:func:`difattn.linear_attention` on ``backend``'s kernels. Returns ``(B, H, N, Dv)``."""
    out, _, _ = linear_attention_fwd(q, k, v, normalize, float(eps), backend)
    return out


def dydila_on_kernels(
    q, k, v, q_aux, k_aux, *, gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k,
    normalize: bool, eps: float, backend: str,
) -> torch.Tensor:
    """:func:`difattn.dydila_attention` on ``backend``'s kernels (k, v may hold ``Nk != N`` tokens). Returns
    ``(B, H, N, Dv)``."""
    values = dict(zip(PER_TOKEN, (gamma_q, gamma_k, gamma_q_aux, gamma_k_aux, lambda_q, lambda_k)))
    params = [_per_token(values[name], k if "_k" in name else q) for name in PER_TOKEN]
    out, _, _ = dydila_fwd(q, k, v, q_aux, k_aux, *params, normalize, float(eps), backend)
    return out
