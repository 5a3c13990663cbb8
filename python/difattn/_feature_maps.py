"""DyDiLA's norm-preserving power map, in plain torch: the feature map of the torch reference and of the layers'
λ routers (which route on the features without gradient)."""

from __future__ import annotations

import torch

PerToken = torch.Tensor | float  # a (B, H, N) tensor or one value for every token


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column(value: PerToken, dtype: torch.dtype) -> PerToken:
    """A ``(B, H, N)`` tensor as ``(B, H, N, 1)`` in ``dtype`` (it scales rows of ``(B, H, N, D)``); a float as is."""
    return value.to(dtype).unsqueeze(-1) if isinstance(value, torch.Tensor) else value


def power_map(z: torch.Tensor, gamma: PerToken, eps: float = 1e-6) -> torch.Tensor:
    """The norm-preserving power map ``φ_γ(z) = ‖r‖ · r^γ / ‖r^γ‖`` with ``r = relu(z) + eps``.

    Args:
        z: ``(B, H, N, D)``; norms run over the head dim D.
        gamma: ``(B, H, N)`` exponent per token, or a float for every token.

    Computed in float32 (float64 for float64 z); returns ``(B, H, N, D)`` in z's dtype.
    """
    acc = accumulation_dtype(z.dtype)
    r = torch.relu(z.to(acc)) + eps
    # r^γ / ‖r^γ‖ is unchanged when r is divided by any positive constant; dividing by the row's largest entry
    # keeps every power <= 1, so large activations or exponents cannot overflow. The map does not depend on
    # that divisor, so it carries no gradient.
    powered = (r / r.amax(dim=-1, keepdim=True).detach()) ** column(gamma, acc)
    out = r.norm(dim=-1, keepdim=True) * powered / powered.norm(dim=-1, keepdim=True)
    return out.to(z.dtype)
