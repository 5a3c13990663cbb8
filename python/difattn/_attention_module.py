"""``difattn.nn.Attention``: a DiT self-attention layer whose attention method is an option.

Parameters are named like timm's ``Attention`` (``qkv``, ``proj``, and ``q_norm``/``k_norm`` when ``qk_norm``) and
``forward`` takes timm's call, so the module replaces ``block.attn`` of a timm ViT or DiT and a pretrained model's
attention weights load unchanged whatever the method; methods that add
weights (CLEAR's global-token pooling, the depthwise conv of linear attention, DyDiLA's banks and routers) add
them under their own names. For ``"dydila"`` those are the names of :class:`difattn.nn.DyDiLA` (``q_aux``,
``k_aux``, ``kernels``, ``lambdas``, ``dwconv``), whose building blocks it reuses, so the two load each other's
weights.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._checks import check_int, check_tokens
from ._options import clear_proportional, clear_proportional_scale
from ._linear_layers import add_dynamic_routers, conv_on_grid, depthwise_conv, dynamic_differential
from ._methods import SPARSE_METHODS, check_options, sparse_attention, square_grid
from ._rope import apply_rope
from .grid import TokenGrid, check_grid

METHODS = ("dense", "clear", "grat", "pisa", "llsa", "linear", "dydila")

# Options handled by the module itself rather than passed to a public function.
_MODULE_OPTIONS: dict[str, frozenset[str]] = {
    "dense": frozenset(),
    "clear": SPARSE_METHODS["clear"].options | {"down_factor", "proportional_attention"},
    "grat": SPARSE_METHODS["grat"].options,
    "pisa": SPARSE_METHODS["pisa"].options,
    "llsa": SPARSE_METHODS["llsa"].options,
    "linear": frozenset({"normalize", "eps", "dwconv_kernel", "backend"}),
    "dydila": frozenset(
        {"num_projectors", "num_kernels", "num_lambdas", "dwconv_kernel", "normalize", "eps", "backend"}
    ),
}
_LINEAR_DEFAULTS = {"linear": {"normalize": True, "eps": 1e-6}, "dydila": {"normalize": False, "eps": 1e-6}}
_DYDILA_SIZES = {"num_projectors": 3, "num_kernels": 9, "num_lambdas": 9}


def _qk_norm(qk_norm: bool | str, head_dim: int) -> Callable[[], nn.Module]:
    """Factory of the per-head q/k norm: timm's LayerNorm for ``True``/``"layer_norm"``, RMSNorm for ``"rms_norm"``."""
    if qk_norm is False:
        return nn.Identity
    if qk_norm is True or qk_norm == "layer_norm":
        return lambda: nn.LayerNorm(head_dim)
    if qk_norm == "rms_norm":
        return lambda: nn.RMSNorm(head_dim, eps=1e-6)
    raise ValueError(f"qk_norm must be False, True, 'layer_norm' or 'rms_norm', got {qk_norm!r}")


class Attention(nn.Module):
    """Multi-head self-attention with a choice of attention method, a drop-in for timm's ``Attention``.

    Args:
        dim: model width; ``num_heads`` must divide it.
        method: ``"dense"`` (SDPA), ``"clear"``, ``"grat"``, ``"pisa"``, ``"llsa"`` (the sparse methods of
            :mod:`difattn`), ``"linear"`` (LiT: ReLU features, linear attention, depthwise conv on V) or
            ``"dydila"`` (dynamic differential linear attention, arXiv 2601.13683).
        qkv_bias: bias of the fused ``qkv`` projection; ``False`` by default, as in timm's ``Attention`` (timm's
            ViTs and facebookresearch/DiT pass ``qkv_bias=True``, and so does :mod:`difattn.models`).
        qk_norm: ``False``, ``True``/``"layer_norm"`` (timm) or ``"rms_norm"``: a norm over each head's q and k.
        num_prefix_tokens: tokens before the image (timm's class token and registers, ``model.num_prefix_tokens``);
            the methods treat them as text tokens of the grid: they attend to every token and every token attends
            to them.
        **method_options: the method's options, checked by name: ``radius``, ``temporal_radius``, ``down_factor``
            (CLEAR global tokens, pooled by the parameter ``spatial_weight`` as :func:`difattn.clear_global_kv`),
            ``proportional_attention`` (CLEAR's high-resolution inference: ``True``, or the training sequence length
            ``T`` (``True``: 4608, FLUX at 1024² with 512 text tokens), gives ``scale = sqrt(log_T(c·N) / head_dim)``
            for N tokens, ``c = 10`` with global tokens and 1 without, as the released processors), ``backend``;
            ``group``, ``pattern``, ``reach`` (GRAT); ``density``, ``block_size``, ``order``, ``routing_bias``,
            ``sink`` (PISA); ``block_size``, ``topk``, ``levels``, ``coarse_pooling``, ``token_weight`` (LLSA);
            ``normalize``, ``eps``, ``dwconv_kernel`` (linear, DyDiLA; 0 disables the conv); ``num_projectors``,
            ``num_kernels``, ``num_lambdas`` (DyDiLA, with :class:`difattn.nn.DyDiLA`'s parameter names).

    ``forward(x, attn_mask=None, *, is_causal=False, grid=None, rope=None)``: ``x`` is ``(B, N, dim)``; returns
    ``(B, N, dim)``. ``attn_mask`` and ``is_causal`` are timm's and SDPA's; only ``"dense"`` on one process takes
    them (otherwise they must be None/False, which is what timm passes by default). ``grid`` describes the N
    tokens; given without text tokens it gets the ``num_prefix_tokens`` in front. When it is None, a square image
    grid after the prefix tokens is inferred when ``N - num_prefix_tokens`` is a perfect square; CLEAR, GRAT,
    CLEAR's global tokens and the depthwise conv need a grid (``ValueError`` otherwise), PISA and LLSA use it when
    known and run in sequence order otherwise. ``rope=(cos, sin)``, each ``(N, head_dim)``, rotates q and k after
    the norm.

    ``process_group``: None (one process), or a ``ProcessGroup`` / 1-D ``DeviceMesh`` to run sequence-parallel:
    ``x`` is then this rank's shard of the tokens (:func:`difattn.distributed.shard`), ``grid`` the full grid
    (required), ``rope`` this rank's rows of the tables, and the output this rank's shard; attention runs through
    :func:`difattn.distributed.attention` (exact), the depthwise conv gets its halo rows and CLEAR's global tokens
    are pooled per stripe and all-reduced. Parameter gradients are then this rank's share: sum them over the group.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        method: str = "dense",
        qkv_bias: bool = False,
        qk_norm: bool | str = False,
        num_prefix_tokens: int = 0,
        process_group: Any = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        required = SPARSE_METHODS[method].required if method in SPARSE_METHODS else frozenset()
        options = check_options(method, method_options, _MODULE_OPTIONS[method], required)
        self.method, self.num_heads, self.head_dim = method, num_heads, dim // num_heads
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        norm = _qk_norm(qk_norm, self.head_dim)
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(dim, dim)

        self.spatial_weight: nn.Parameter | None = None  # CLEAR's global-token pooling (reference name and shape)
        self.dwconv: nn.Conv2d | None = None  # linear attention's depthwise conv on V
        down_factor = options.pop("down_factor", None)
        if down_factor is not None and check_int("down_factor", down_factor, minimum=1) > 1:
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, down_factor, 1, down_factor, 1), down_factor**-2.0))
        self.proportional_attention = clear_proportional(options.pop("proportional_attention", False))
        if method in ("linear", "dydila"):
            self.dwconv = depthwise_conv(dim, options.pop("dwconv_kernel", 5))
            options = {**_LINEAR_DEFAULTS[method], **options}
        if method == "dydila":
            sizes = {name: options.pop(name, size) for name, size in _DYDILA_SIZES.items()}
            add_dynamic_routers(self, dim, self.head_dim, bias=qkv_bias, **sizes)
        self.options = options
        self._group = None
        if process_group is not None:
            from .distributed._comm import SharedGroup

            self._group = SharedGroup(process_group)

    @property
    def process_group(self) -> Any:
        """The process group the layer runs sequence-parallel over, or None."""
        return None if self._group is None else self._group.group

    def extra_repr(self) -> str:
        opts = "".join(f", {name}={value!r}" for name, value in sorted(self.options.items()))
        prefix = f", num_prefix_tokens={self.num_prefix_tokens}" if self.num_prefix_tokens else ""
        return f"method={self.method!r}, heads={self.num_heads}, head_dim={self.head_dim}{prefix}{opts}"

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        grid: TokenGrid | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if isinstance(attn_mask, TokenGrid):
            raise TypeError("attn_mask: got a TokenGrid; pass it by name, attn(x, grid=grid) (the second positional "
                            "argument is timm's attn_mask)")
        dense = self.method == "dense" and self.process_group is None
        if not dense and (attn_mask is not None or is_causal):
            raise ValueError(f"attn_mask, is_causal: method {self.method!r} (or a sharded layer) takes no attention "
                             "mask and is not causal; only method='dense' on one process accepts them")
        B, N = check_tokens(x, self.qkv.in_features)  # x: (B, N, dim); this rank's shard of the tokens when sharded
        C = x.shape[2]
        grid = self._grid(N, grid)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if dense:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        elif self.process_group is None:
            out = _ATTEND[self.method](self, x, q, k, v, grid)  # (B, H, N, Dh)
        else:
            out = self._attend_sharded(x, q, k, v, grid)
        out = out.transpose(1, 2).reshape(B, N, C)
        if self.dwconv is not None:
            out = out + self._conv_on_grid(v.transpose(1, 2).reshape(B, N, C), grid)
        return self.proj(out)

    def _grid(self, num_tokens: int, grid: TokenGrid | None) -> TokenGrid | None:
        """The grid of the N tokens: ``grid`` (with the prefix tokens put in front when it has no text), else the
        square image grid after the prefix tokens when ``N - num_prefix_tokens`` is a perfect square, else None.
        A sharded layer's N is its shard: its grid, the full one, is taken as given (no inference)."""
        prefix, sharded = self.num_prefix_tokens, self.process_group is not None
        if grid is not None:
            if prefix and grid.text_tokens == 0 and (sharded or grid.num_tokens + prefix == num_tokens):
                grid = TokenGrid(grid.height, grid.width, grid.frames, prefix, "first")
            if not sharded:
                check_grid(grid, num_tokens)
            return grid
        side = math.isqrt(max(num_tokens - prefix, 0))
        if sharded or not side or side * side != num_tokens - prefix:
            return None
        return TokenGrid(side, side, 1, prefix, "first")

    def _needed(self, grid: TokenGrid | None, num_tokens: int) -> TokenGrid:
        """``grid``; when there is none, the ``ValueError`` that says how to pass one."""
        return square_grid(num_tokens - self.num_prefix_tokens, self.method) if grid is None else grid

    # Each _attend_* maps (x, q, k, v, grid) to the (B, H, N, Dh) attention output.

    def _scale(self, num_tokens: int) -> float | None:
        """The attention scale of a call over ``num_tokens`` (the whole sequence): CLEAR's proportional attention's,
        or None (the method's default)."""
        if self.proportional_attention is None:
            return None
        return clear_proportional_scale(num_tokens, self.head_dim, self.proportional_attention,
                                        self.spatial_weight is not None)

    def _attend_sparse(self, x, q, k, v, grid):
        if SPARSE_METHODS[self.method].needs_grid or self.spatial_weight is not None:
            grid = self._needed(grid, q.shape[2])
        global_kv = None if self.spatial_weight is None else functional.clear_global_kv(k, v, grid, self.spatial_weight)
        return sparse_attention(self.method, q, k, v, grid=grid, options=self.options, global_kv=global_kv,
                                scale=self._scale(q.shape[2]))

    def _attend_linear(self, x, q, k, v, grid):
        return functional.linear_attention(F.relu(q), F.relu(k), v, **self.options)

    def _attend_dydila(self, x, q, k, v, grid):
        """As :class:`difattn.nn.DyDiLA`, on this module's (normed, rotated) q and k."""
        return dynamic_differential(self, x, q, k, v, **self.options)

    def _attend_sharded(self, x, q, k, v, grid):
        """The method on this rank's shard, through :func:`difattn.distributed.attention`."""
        if grid is None:
            raise ValueError("grid: a sharded Attention (process_group set) needs the full TokenGrid of the sequence")
        from . import distributed  # torch.distributed is imported only when a sharded layer runs

        group = self.process_group
        if self.method == "dydila":

            def attend(q, k, v, q_aux, k_aux, **options):
                return distributed.attention("dydila", q, k, v, grid, process_group=group, q_aux=q_aux, k_aux=k_aux,
                                             **options)

            return dynamic_differential(self, x, q, k, v, attend=attend, **self.options)
        options = dict(self.options)
        if self.method == "linear":
            q, k = F.relu(q), F.relu(k)
        if self.spatial_weight is not None:
            from .distributed._pool import global_kv_on_stripes

            options["global_kv"] = global_kv_on_stripes(k, v, grid, self.spatial_weight, process_group=group)
        if self.proportional_attention is not None:
            options["scale"] = self._scale(grid.num_tokens)
        return distributed.attention(self.method, q, k, v, grid, process_group=group, **options)

    def _conv_on_grid(self, v: torch.Tensor, grid: TokenGrid | None) -> torch.Tensor:
        """Depthwise conv of the image tokens of ``v`` ``(B, N, C)`` on their grid; text rows get zeros."""
        if self.process_group is not None:
            from .distributed._conv import conv_on_stripes

            return conv_on_stripes(self.dwconv, v, grid, process_group=self.process_group)
        return conv_on_grid(self.dwconv, v, self._needed(grid, v.shape[1]))


_ATTEND = {
    "clear": Attention._attend_sparse,
    "grat": Attention._attend_sparse,
    "pisa": Attention._attend_sparse,
    "llsa": Attention._attend_sparse,
    "linear": Attention._attend_linear,
    "dydila": Attention._attend_dydila,
}
