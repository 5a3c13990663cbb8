"""Attention modules for linear Diffusion Transformers: ``DyDiLA`` (arXiv 2601.13683) and ``LiTAttention`` (LiT).

Both take ``x (B, N, dim)`` and an optional :class:`~difattn.TokenGrid` (a square image grid is inferred when N
is a perfect square), name their projections like timm's ``Attention`` (``qkv``, ``proj``) so a DiT's attention
weights load unchanged, and add a depthwise conv on V over the image tokens (``dwconv``, a plain ``nn.Conv2d``).
The kernels live behind :func:`difattn.dydila_attention` / :func:`difattn.linear_attention`; nothing here computes
attention itself.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._attention_module import Attention
from ._checks import check_bool, check_tokens
from ._linear_layers import (
    RoutedProjection,
    RoutedValue,
    add_dynamic_routers,
    check_heads,
    conv_on_grid,
    depthwise_conv,
    dynamic_differential,
    grid_for,
    straight_through,
)
from .grid import TokenGrid

__all__ = ["Attention", "DyDiLA", "LiTAttention", "RoutedProjection", "RoutedValue", "straight_through", "conv_on_grid"]


class _LinearAttentionLayer(nn.Module):
    """What DyDiLA and LiT share: ``qkv``, an attention core on ``(B, H, N, Dh)`` heads (:meth:`_attend`), a
    ``dwconv_kernel``² depthwise conv of V on the image grid added to its output, and ``proj``."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, dwconv_kernel: int, normalize: bool, eps: float,
                 backend: str) -> None:
        super().__init__()
        self.head_dim = check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.normalize, self.eps, self.backend = check_bool("normalize", normalize), eps, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.dwconv = depthwise_conv(dim, dwconv_kernel)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, normalize={self.normalize}"

    def _attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, grid: TokenGrid | None = None) -> torch.Tensor:
        B, N = check_tokens(x, self.qkv.in_features)  # x: (B, N, dim)
        C = x.shape[2]
        grid = grid_for(N, grid) if self.dwconv is not None or grid is not None else None
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        out = self._attend(x, q, k, v).transpose(1, 2).reshape(B, N, C)
        if self.dwconv is not None:
            out = out + conv_on_grid(self.dwconv, v.transpose(1, 2).reshape(B, N, C), grid)
        return self.proj(out)


class DyDiLA(_LinearAttentionLayer):
    """Dynamic differential linear attention (Cao et al., arXiv 2601.13683).

    Shared projections ``q, k, v = qkv(x)``; routed auxiliary projections ``q_aux``, ``k_aux`` (banks of
    ``num_projectors`` full-width projectors, one per token); per-token, per-head kernel exponents γ for the four
    streams (``kernels``: routers over the head's features picking from banks of ``num_kernels`` values, initialised
    over [1, 5], clamped ≥ 1); per-token λ for the token differential (``lambdas``: routers over
    ``[φ(z), φ(z_aux)]`` picking from banks of ``num_lambdas`` values, initialised over [0, 0.5]); then
    :func:`difattn.dydila_attention`, plus a ``dwconv_kernel``² depthwise conv of V on the image grid (0: none),
    and the output projection ``proj``.

    Args:
        dim, num_heads: model width and heads (``num_heads`` divides ``dim``; LiT uses few, e.g. 2 or 4).
        num_projectors, num_kernels, num_lambdas: bank sizes n_P, n_K, n_D.
        dwconv_kernel: odd side of the depthwise conv on V, or 0 for none.
        normalize, eps: passed to :func:`difattn.dydila_attention` (``eps`` also offsets the power maps).
        qkv_bias: bias of ``qkv`` and of the auxiliary projector banks.
        backend: the backend of the attention core (``"auto"``, ``"rust"``, ``"triton"``, ``"torch"``).

    ``forward(x, grid=None)``: ``x (B, N, dim)``; returns ``(B, N, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_projectors: int = 3,
        num_kernels: int = 9,
        num_lambdas: int = 9,
        dwconv_kernel: int = 5,
        normalize: bool = False,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, dwconv_kernel=dwconv_kernel, normalize=normalize, eps=eps,
                         backend=backend)
        add_dynamic_routers(self, dim, self.head_dim, num_projectors=num_projectors, num_kernels=num_kernels,
                            num_lambdas=num_lambdas, bias=qkv_bias)

    def _attend(self, x, q, k, v):
        return dynamic_differential(self, x, q, k, v, eps=self.eps, normalize=self.normalize, backend=self.backend)


class LiTAttention(_LinearAttentionLayer):
    """LiT's attention: ReLU features, linear attention (normalised by default), plus a ``dwconv_kernel``²
    depthwise conv of V on the image grid, then ``proj``. Parameters ``qkv``, ``proj`` as timm's ``Attention``,
    ``dwconv`` a plain ``nn.Conv2d``.

    Args:
        dim, num_heads: model width and heads (``num_heads`` divides ``dim``).
        qkv_bias: bias of ``qkv``.
        dwconv_kernel: odd side of the depthwise conv on V, or 0 for none.
        normalize, eps, backend: passed to :func:`difattn.linear_attention`.

    ``forward(x, grid=None)``: ``x (B, N, dim)``; returns ``(B, N, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        dwconv_kernel: int = 5,
        normalize: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, dwconv_kernel=dwconv_kernel, normalize=normalize, eps=eps,
                         backend=backend)

    def _attend(self, x, q, k, v):
        return functional.linear_attention(
            F.relu(q), F.relu(k), v, normalize=self.normalize, eps=self.eps, backend=self.backend
        )
