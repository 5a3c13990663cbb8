"""Building blocks of the linear-attention layers, shared by :class:`difattn.nn.DyDiLA`, :class:`difattn.nn.LiTAttention`
and ``difattn.nn.Attention(method="dydila" | "linear")``: DyDiLA's routed projections and routed scalars
(straight-through routing), the routers' registration and use, and the depthwise conv of V on the token grid.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._checks import check_int
from ._feature_maps import power_map
from .grid import TokenGrid, check_grid

STREAMS = ("q", "k", "q_aux", "k_aux")


def straight_through(logits: torch.Tensor) -> torch.Tensor:
    """Routing weights over the last dim: the one-hot argmax in the forward pass, the softmax's gradient in the
    backward pass (straight-through estimator): ``hard + (soft − soft.detach())``, bracketed so the forward value
    is exactly one-hot (``hard + soft − soft`` would round)."""
    soft = logits.softmax(dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


class RoutedProjection(nn.Module):
    """``num_projectors`` full-width projectors ``W^j`` and a router: each token uses ``x W^u``,
    ``u = argmax(x R)`` (straight-through). ``bank`` holds the projectors side by side, ``router`` is ``R``."""

    def __init__(self, dim: int, num_projectors: int, *, bias: bool = True) -> None:
        super().__init__()
        self.num_projectors = check_int("num_projectors", num_projectors, minimum=1)
        self.bank = nn.Linear(dim, num_projectors * dim, bias=bias)
        self.router = nn.Linear(dim, num_projectors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # (B, N, dim)
        weights = straight_through(self.router(x))  # (B, N, P)
        # Every projector runs: the estimator's backward needs each one's output.
        projected = self.bank(x).view(B, N, self.num_projectors, C)
        return torch.einsum("bnp,bnpc->bnc", weights.to(projected.dtype), projected)  # (B, N, dim)


class RoutedValue(nn.Module):
    """A learnable bank of ``size`` scalars, initialised evenly over ``[low, high]`` and used clamped to ``>= minimum``,
    and a router over ``in_features`` that picks one per row (straight-through). The router's input is detached:
    it learns from the estimator, not by moving the features it routes on (spec choice)."""

    def __init__(self, in_features: int, size: int, *, low: float, high: float, minimum: float | None = None) -> None:
        super().__init__()
        self.router = nn.Linear(in_features, size)
        self.bank = nn.Parameter(torch.linspace(low, high, size))
        self.minimum = minimum

    def values(self) -> torch.Tensor:
        """The bank, clamped in the forward pass; the clamp passes gradients straight through (a plain clamp has
        none at the bound, so the entry initialised at the minimum could never move)."""
        if self.minimum is None:
            return self.bank
        return self.bank.detach().clamp_min(self.minimum) + (self.bank - self.bank.detach())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = straight_through(self.router(features.detach().to(self.router.weight.dtype)))  # (..., size)
        return weights @ self.values()  # (...)


def grid_for(num_tokens: int, grid: TokenGrid | None) -> TokenGrid:
    if grid is not None:
        check_grid(grid, num_tokens)
        return grid
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"grid: N = {num_tokens} tokens is not a perfect square, so no square image grid can be inferred; "
            "pass grid=difattn.TokenGrid(height, width, ...)"
        )
    return TokenGrid(side, side)


def conv_on_grid(conv: nn.Conv2d, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """A 2D conv of the image tokens of ``tokens (B, N, C)`` over their grid, each frame on its own; text rows get
    zeros. Returns ``(B, N, C)``."""
    B, N, C = tokens.shape
    image = slice(grid.image_range.start, grid.image_range.stop)
    frames = tokens[:, image].reshape(B * grid.frames, grid.height, grid.width, C).permute(0, 3, 1, 2)
    conv_out = conv(frames).permute(0, 2, 3, 1).reshape(B, grid.image_tokens, C)
    if grid.text_tokens == 0:
        return conv_out
    text = conv_out.new_zeros(B, grid.text_tokens, C)
    return torch.cat((text, conv_out) if grid.text_position == "first" else (conv_out, text), dim=1)


def depthwise_conv(dim: int, kernel: int) -> nn.Conv2d | None:
    kernel = check_int("dwconv_kernel", kernel, minimum=0)
    if kernel and kernel % 2 == 0:
        raise ValueError(f"dwconv_kernel must be odd (a centred 'same' conv) or 0 (none), got {kernel}")
    return nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim) if kernel else None


def check_heads(dim: int, num_heads: int) -> int:
    check_int("dim", dim, minimum=1)
    check_int("num_heads", num_heads, minimum=1)
    if dim % num_heads:
        raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
    return dim // num_heads


def add_dynamic_routers(
    module: nn.Module, dim: int, head_dim: int, *, num_projectors: int, num_kernels: int, num_lambdas: int, bias: bool
) -> None:
    """Registers DyDiLA's per-token routing on ``module`` under the names :class:`DyDiLA` and
    ``Attention(method="dydila")`` share (so each loads the other's weights): ``q_aux``, ``k_aux`` (projector
    banks), ``kernels`` (γ of the four streams, banks over [1, 5] clamped >= 1) and ``lambdas`` (λ of q and k,
    banks over [0, 0.5])."""
    check_int("num_kernels", num_kernels, minimum=1)
    check_int("num_lambdas", num_lambdas, minimum=1)
    module.q_aux = RoutedProjection(dim, num_projectors, bias=bias)
    module.k_aux = RoutedProjection(dim, num_projectors, bias=bias)
    module.kernels = nn.ModuleDict(
        {s: RoutedValue(head_dim, num_kernels, low=1.0, high=5.0, minimum=1.0) for s in STREAMS}
    )
    module.lambdas = nn.ModuleDict({s: RoutedValue(2 * head_dim, num_lambdas, low=0.0, high=0.5) for s in ("q", "k")})


def dynamic_differential(
    module: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float,
    attend: Callable[..., torch.Tensor] | None = None, **options,
) -> torch.Tensor:
    """DyDiLA's core with the routers :func:`add_dynamic_routers` put on ``module``: the auxiliary projections of
    ``x (B, N, dim)``, per-token γ of each stream and λ of each side (λ routed on ``[φ(z), φ(z_aux)]`` without
    gradient, spec choice), then ``attend`` (default :func:`difattn.dydila_attention`; or its sequence-parallel
    form) on ``q, k, v (B, H, N, Dh)`` with ``options`` (``normalize``, ``backend``). Returns ``(B, H, N, Dh)``."""
    B, N, _ = x.shape
    H, Dh = q.shape[1], q.shape[3]
    streams = {"q": q, "k": k}
    for name in ("q_aux", "k_aux"):
        streams[name] = getattr(module, name)(x).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh), no copy
    gammas = {s: module.kernels[s](z) for s, z in streams.items()}  # (B, H, N) each
    lambdas = {}
    for side in ("q", "k"):
        with torch.no_grad():
            features = torch.cat([power_map(streams[s], gammas[s], eps) for s in (side, f"{side}_aux")], dim=-1)
        lambdas[side] = module.lambdas[side](features)
    attend = functional.dydila_attention if attend is None else attend
    return attend(
        q, k, v, streams["q_aux"], streams["k_aux"],
        gamma_q=gammas["q"], gamma_k=gammas["k"], gamma_q_aux=gammas["q_aux"], gamma_k_aux=gammas["k_aux"],
        lambda_q=lambdas["q"], lambda_k=lambdas["k"], eps=eps, **options,
    )
