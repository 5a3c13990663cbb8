"""The public functions: one per method. Each validates its arguments, then runs the implementation the
backend table picks (:mod:`difattn.backends`).

Layout everywhere: ``q, k: (B, H, N, D)``, ``v: (B, H, N, Dv)``, any strides; the output is ``(B, H, N, Dv)`` in
q's dtype on q's device, tokens in the caller's order (image tokens in raster order, as patchify emits them).

Non-finite inputs, every method and backend: NaN/±inf in q or k give the torch reference's NaN/inf pattern; a
non-finite ``v[j, c]`` makes ``out[i, c]`` non-finite for every query i that attends key j (for linear attention
and DyDiLA: every query), may for the other queries of a block computed against j's block, and leaves every
other output finite. A call whose buffers do not fit in memory raises ``MemoryError`` (``RuntimeError`` from
torch's allocator), never aborts.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch

from . import _options
from ._checks import (
    check_bool,
    check_backend,
    check_choice,
    check_float,
    check_int,
    check_qkv,
    check_same_kind,
    check_tensor,
    resolve_scale,
)
from .backends import select
from .grid import TokenGrid, check_grid


def clear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    *,
    radius: float,
    scale: float | None = None,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    temporal_radius: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLEAR: each image query sees the image keys in a disc of ``radius`` around it, plus all text.

    ``allowed(q, k) = q is text or k is text or (dy² + dx² < radius² and |dt| < temporal_radius)``; windows are
    clipped at the grid border. ``temporal_radius`` defaults to ``grid.frames`` (every frame).
    ``global_kv=(k_g, v_g)``, shapes ``(B, H, G, D)`` and ``(B, H, G, Dv)``: extra keys every image query (not
    text) attends in the same softmax. Returns ``(B, H, N, Dv)``.
    """
    B, H, N, D, Dv = check_qkv(q, k, v)
    check_grid(grid, N)
    r, rt = _options.clear_radii(grid, radius, temporal_radius)
    scale = resolve_scale(scale, D)
    if global_kv is not None:
        _check_global_kv(global_kv, q, v)
    impl = select("clear", check_backend(backend), q.device, q.dtype)
    return impl(q, k, v, grid, radius=r, temporal_radius=rt, scale=scale, global_kv=global_kv)


def clear_global_kv(
    k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, spatial_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLEAR's global tokens (the paper's ``down_factor`` variant): learnable weighted ``d x d`` poolings of the image
    keys and values, for :func:`clear_attention`'s ``global_kv``.

    ``k: (B, H, N, D)``, ``v: (B, H, N, Dv)`` (post-norm, post-RoPE, the sequence ``grid`` describes);
    ``spatial_weight``: ``(1, 1, 1, d, 1, d, 1)``, one weight per window cell shared over heads and channels: the
    tensor the released CLEAR checkpoints store as ``<attention layer>.processor.spatial_weight`` (e.g.
    ``transformer_blocks.0.attn.processor.spatial_weight`` in ``clear_local_8_down_4.safetensors``; initialised to
    ``1/d²``), the parameter of the same name that :func:`difattn.diffusers.apply` (``down_factor=d``) and
    :class:`difattn.nn.Attention` create. Each frame is pooled on its own; sides that are not multiples of ``d`` are
    zero-padded, so border windows sum only the tokens they hold (the released code requires divisibility).
    Returns ``(k_g, v_g)``, ``(B, H, frames * ceil(h/d) * ceil(w/d), ·)``, windows in raster order. Differentiable
    in ``k``, ``v`` and ``spatial_weight``.
    """
    B, H, N, D, Dv = check_qkv(k, k, v)
    check_grid(grid, N)
    check_tensor("spatial_weight", spatial_weight, ndim=7)
    d = spatial_weight.shape[3]
    if spatial_weight.shape != (1, 1, 1, d, 1, d, 1):
        raise ValueError(f"spatial_weight must have shape (1, 1, 1, d, 1, d, 1), got {tuple(spatial_weight.shape)}")
    if spatial_weight.device != k.device:
        raise ValueError(f"spatial_weight must be on k's device ({k.device}), got {spatial_weight.device}")
    image = slice(grid.image_range.start, grid.image_range.stop)
    pad_h, pad_w = -grid.height % d, -grid.width % d

    def pool(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, image].reshape(B * H * grid.frames, grid.height, grid.width, x.shape[-1])
        x = torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # pads width, then height
        rows, cols = (grid.height + pad_h) // d, (grid.width + pad_w) // d
        windows = x.reshape(B, H, grid.frames * rows, d, cols, d, x.shape[-1]) * spatial_weight.to(x.dtype)
        return windows.sum(dim=(3, 5)).flatten(2, 3)

    return pool(k), pool(v)


def grat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    *,
    group: tuple[int, ...] | None = None,
    pattern: str = "neighbors",
    reach: int = 1,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GRAT: image tokens in groups of ``group`` share one key set.

    ``group``: ``(gh, gw)`` or ``(gt, gh, gw)``; default 16x16 on images, 4x8x8 on videos.
    ``pattern="neighbors"``: groups within ``reach`` on every axis; ``"criss_cross"``: the group's row and
    column bands (and its frame plane on videos). Text queries see every valid key, every query sees valid text.
    ``text_mask``: ``(B, T)`` bool, True for real (non-padding) text tokens; or, as the authors' released code takes
    it, the attendable text count of each sample, an integer tensor ``(B,)``: sample b's first ``n_b`` text tokens
    are real (``mask[b, t] = t < n_b``). Returns ``(B, H, N, Dv)``.
    """
    B, H, N, D, Dv = check_qkv(q, k, v)
    check_grid(grid, N)
    group = _options.grat_group(grid, group)
    check_choice("pattern", pattern, _options.GRAT_PATTERNS)
    check_int("reach", reach, minimum=0)
    text_mask = _options.grat_text_mask(text_mask, B, grid, q.device)
    scale = resolve_scale(scale, D)
    impl = select("grat", check_backend(backend), q.device, q.dtype)
    return impl(q, k, v, grid, group=group, pattern=pattern, reach=reach, text_mask=text_mask, scale=scale)


@overload
def pisa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, density: float = ..., block_size: int = ...,
    order: str = ..., routing_bias: bool | str = ..., sink: str | None = ..., grid: TokenGrid | None = ...,
    return_blocks: Literal[False] = ..., scale: float | None = ..., blocks: torch.Tensor | None = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def pisa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, density: float = ..., block_size: int = ...,
    order: str = ..., routing_bias: bool | str = ..., sink: str | None = ..., grid: TokenGrid | None = ...,
    return_blocks: Literal[True], scale: float | None = ..., blocks: torch.Tensor | None = ..., backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def pisa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, density: float = ..., block_size: int = ...,
    order: str = ..., routing_bias: bool | str = ..., sink: str | None = ..., grid: TokenGrid | None = ...,
    return_blocks: bool, scale: float | None = ..., blocks: torch.Tensor | None = ..., backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def pisa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    density: float = 0.125,
    block_size: int = 64,
    order: str = "hybrid",
    routing_bias: bool | str = False,
    sink: str | None = None,
    grid: TokenGrid | None = None,
    return_blocks: bool = False,
    scale: float | None = None,
    blocks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PISA: exact attention on the top ``density`` of key blocks, Taylor-approximated attention on the rest.

    ``order``: ``"zeroth"`` (block centroids), ``"hybrid"`` (centroids + the mean first-order term; the paper's
    method) or ``"first"`` (per-block first-order terms). The hybrid term is ``s·(Σ_U n_j e^{c_j−m})·q·H̄`` with
    ``H̄ = (1/N) Σ_j H_j`` the mean moment per token: each unselected block j stands in for its ``q·H_j`` by
    ``n_j q·H̄`` (the authors' released kernels; with equal blocks it is the paper's ``(1/M) Σ_j H_j``).
    ``routing_bias``: ``False``; ``True`` or ``"centered"`` (the paper, ``+ ln(‖H_j − (1/M) Σ_i H_i‖_F + 1e-5)``);
    ``"uncentered"`` (the released kernels and FLUX processor, ``+ ln(‖H_j‖_F + 1e-5)``); ``"key_variance"`` (the
    authors' trainable zeroth-order variant, ``+ ln(max(var_j, 1e-8))``, ``var_j = (1/n_j) Σ_{t∈j} ‖k_t − k̄_j‖²``).
    ``sink="first"/"last"`` always keeps block 0 / M-1 exact. With ``grid``, blocks are text runs and image tiles
    (8x8 for 64, 8x16 for 128) that never mix text and image. ``blocks``: a selection ``(B, H, M, k)`` int64 to use
    instead of the routing (the form ``return_blocks=True`` returns; ``k = max(1, floor(density · M))``, ids in
    ``[0, M)``, none twice in a row; ``routing_bias`` and ``sink`` must then be left unset). Returns
    ``(B, H, N, Dv)``, plus the selected block ids ``(B, H, M, k)`` with ``return_blocks=True``.

    Cross-attention (the authors' zeroth-order variant allows it): k, v may hold ``Nk != N`` tokens
    (``(B, H, Nk, D)``, ``(B, H, Nk, Dv)``), without a grid. Query blocks are then runs of ``block_size`` over q
    (``M = ceil(N / b)``), key blocks runs over k (``Mk = ceil(Nk / b)``, ``k = max(1, floor(density · Mk))``, ids in
    ``[0, Mk)``, ``H̄ = (1/Nk) Σ_j H_j``); the selection is ``(B, H, M, k)``.
    """
    B, H, N, D, Dv = check_qkv(q, k, v, cross=True)
    num_keys = k.shape[2]
    bias = _options.check_pisa(density, block_size, order, routing_bias, sink)
    if grid is not None:
        check_grid(grid, N)
        _options.pisa_tile(block_size)
        if num_keys != N:
            raise ValueError(f"grid: cross-attention (k has {num_keys} tokens, q {N}) runs without a grid")
    check_bool("return_blocks", return_blocks)
    scale = resolve_scale(scale, D)
    if blocks is not None:
        if bias is not None or sink is not None:
            raise ValueError("routing_bias and sink choose blocks: leave them unset when blocks is given")
        num_key_blocks = _options.pisa_num_blocks(grid, num_keys, block_size)
        shape = (B, H, _options.pisa_num_blocks(grid, N, block_size),
                 _options.pisa_num_selected(density, num_key_blocks))
        blocks = _options.check_pisa_blocks(blocks, shape, num_key_blocks, q.device)
    options = {"order": order, "cross": num_keys != N}
    impl = select("pisa", check_backend(backend), q.device, q.dtype, options)
    return impl(
        q, k, v, density=density, block_size=block_size, order=order, routing_bias=bias,
        sink=sink, grid=grid, return_blocks=return_blocks, scale=scale, blocks=blocks,
    )


@overload
def llsa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = ..., topk: int | tuple[int, ...] = ...,
    levels: int | None = ..., grid: TokenGrid | None = ..., return_indices: Literal[False] = ...,
    scale: float | None = ..., coarse_pooling: str = ..., token_weight: float | tuple[float, ...] | None = ...,
    indices: list[torch.Tensor] | None = ..., backend: str = ...,
) -> torch.Tensor: ...


@overload
def llsa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = ..., topk: int | tuple[int, ...] = ...,
    levels: int | None = ..., grid: TokenGrid | None = ..., return_indices: Literal[True],
    scale: float | None = ..., coarse_pooling: str = ..., token_weight: float | tuple[float, ...] | None = ...,
    indices: list[torch.Tensor] | None = ..., backend: str = ...,
) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


@overload
def llsa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = ..., topk: int | tuple[int, ...] = ...,
    levels: int | None = ..., grid: TokenGrid | None = ..., return_indices: bool,
    scale: float | None = ..., coarse_pooling: str = ..., token_weight: float | tuple[float, ...] | None = ...,
    indices: list[torch.Tensor] | None = ..., backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]: ...


def llsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 16,
    topk: int | tuple[int, ...] = 8,
    levels: int | None = None,
    grid: TokenGrid | None = None,
    return_indices: bool = False,
    scale: float | None = None,
    coarse_pooling: str = "children",
    token_weight: float | tuple[float, ...] | None = None,
    indices: list[torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """LLSA: hierarchical top-K block selection with coarse-token KV enrichment (log-linear cost, trainable).

    ``topk``: keys kept per query at every level, or one per level ``(K_1, ..., K_L)``, finest first. ``levels``
    defaults to the smallest L with ``N / block_size**L <= 256``. With ``grid`` image tokens are Z-ordered (text
    stays at its end). ``coarse_pooling``: ``"children"`` (default, the authors' rule: a level-l token is the plain
    mean of its ``block_size`` level-(l−1) children, so a model trained with their code runs unchanged) or
    ``"tokens"`` (the mean of all fine tokens under it, its children weighted by their counts); the two differ only
    where a level's last token is short (N not a multiple of ``block_size**(l−1)``, from level 2 on). ``token_weight``:
    the softmax weight of every level-l token (logit ``+ ln w_l``), one float or ``(w_1, ..., w_L)``: the authors'
    kernels take it as ``token_weight, token_weight_2`` and pass ``(block_size, block_size**2)``; None (default)
    weights each token by its count of fine tokens, which is the same except for a short last token, where it is
    what the authors' variable-length kernels use. ``indices``: a selection ``[I_1, ..., I_L]`` to use instead of
    the routing (the form ``return_indices=True`` returns: ``I_l`` int64 ``(B, H, n_l, K_l)``, level-l ids in
    ``[0, n_l)``, none twice in a row). Returns ``(B, H, N, Dv)``, plus ``[I_1, ..., I_L]`` with
    ``return_indices=True``.

    Pooling runs in fp32 whatever the input dtype (the authors' kernels pool in the input dtype): in bf16, at
    N = 4096 with blocks of 16, that keeps the output's error against float64 at about 0.2% where bf16 pooling gives
    about 0.55%, and some 10% of the fine query blocks would route differently.

    The authors' configs list the top-K coarsest first (``sparse_topk``, and ``llsa_l2(q, k, v, topk1, topk2)``
    gets ``sparse_topk[1], sparse_topk[0]``): their two-level ``sparse_topk=[K_2, K_1]`` is
    ``topk=(K_1, K_2), levels=2`` here, and one level takes ``topk=sparse_topk[1], levels=1``.
    """
    B, H, N, D, Dv = check_qkv(q, k, v)
    levels, topks = _options.llsa_config(N, block_size, topk, levels)
    if grid is not None:
        check_grid(grid, N)
    check_bool("return_indices", return_indices)
    scale = resolve_scale(scale, D)
    coarse_pooling = _options.llsa_pooling(coarse_pooling)
    token_weight = _options.llsa_token_weight(token_weight, levels)
    if indices is not None:
        sizes = _options.llsa_level_sizes(N, block_size, levels)
        shapes = [(B, H, sizes[level], kk) for level, kk in enumerate(topks, 1)]
        indices = _options.check_llsa_indices(indices, shapes, q.device)
    impl = select("llsa", check_backend(backend), q.device, q.dtype)
    return impl(
        q, k, v, block_size=block_size, topk=topks, levels=levels, grid=grid, return_indices=return_indices,
        scale=scale, coarse_pooling=coarse_pooling, token_weight=token_weight, indices=indices,
    )


def dydila_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_aux: torch.Tensor,
    k_aux: torch.Tensor,
    *,
    gamma_q: torch.Tensor | float,
    gamma_k: torch.Tensor | float,
    gamma_q_aux: torch.Tensor | float,
    gamma_k_aux: torch.Tensor | float,
    lambda_q: torch.Tensor | float,
    lambda_k: torch.Tensor | float,
    normalize: bool = False,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """DyDiLA core: power maps with per-token exponents, token differential, then linear attention.

    ``q, q_aux: (B, H, N, D)``, ``k, k_aux: (B, H, Nk, D)``, ``v: (B, H, Nk, Dv)`` (``Nk = N`` for self-attention;
    another ``Nk`` is cross-attention); each gamma/lambda is a float or a tensor of its side's tokens, ``(B, H, N)``
    for ``*_q*``, ``(B, H, Nk)`` for ``*_k*``. ``Q̂ = φ(q) − λ_q φ(q_aux)``, ``K̂ = φ(k) − λ_k φ(k_aux)`` with
    ``φ_γ(z) = ‖r‖ r^γ / ‖r^γ‖``, ``r = relu(z) + eps``; ``O = Q̂ S``, ``S = (1/Nk) Σ K̂ᵀ V`` (normalize:
    ``O / (Q̂ · mean(K̂) + eps)``). Returns ``(B, H, N, Dv)``.
    """
    B, H, N, D, Dv = check_qkv(q, k, v, cross=True)
    for name, aux, like, side in (("q_aux", q_aux, q, "q"), ("k_aux", k_aux, k, "k")):
        check_tensor(name, aux, ndim=4)
        check_same_kind(name, aux, "q", q)
        if aux.shape != like.shape:
            raise ValueError(f"{name} must have {side}'s shape {tuple(like.shape)}, got {tuple(aux.shape)}")
    token_params = {
        "gamma_q": gamma_q, "gamma_k": gamma_k, "gamma_q_aux": gamma_q_aux, "gamma_k_aux": gamma_k_aux,
        "lambda_q": lambda_q, "lambda_k": lambda_k,
    }
    for name, value in token_params.items():
        _check_token_param(name, value, (B, H, k.shape[2] if "_k" in name else N), q)
    eps = _options.check_linear(normalize, eps)
    impl = select("dydila", check_backend(backend), q.device, q.dtype)
    return impl(q, k, v, q_aux, k_aux, **token_params, normalize=normalize, eps=eps)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal linear attention on feature-mapped q, k: ``O = q S``, ``S = (1/N) Σ kᵀ v`` (fp32 state),
    divided by ``q · mean(k) + eps`` when ``normalize``. Returns ``(B, H, N, Dv)``."""
    check_qkv(q, k, v)
    eps = _options.check_linear(normalize, eps)
    impl = select("linear", check_backend(backend), q.device, q.dtype)
    return impl(q, k, v, normalize=normalize, eps=eps)


def _check_global_kv(global_kv: Any, q: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(global_kv, (tuple, list)) or len(global_kv) != 2:
        raise TypeError(f"global_kv must be a pair (k_g, v_g) of tensors, got {type(global_kv).__name__}")
    k_g, v_g = global_kv
    for name, x, last in (("global_kv[0]", k_g, q.shape[3]), ("global_kv[1]", v_g, v.shape[3])):
        check_tensor(name, x, ndim=4)
        check_same_kind(name, x, "q", q)
        if x.shape[:2] != q.shape[:2] or x.shape[3] != last or x.shape[2] == 0:
            raise ValueError(
                f"{name} must have shape (B, H, G, {last}) with (B, H) = {tuple(q.shape[:2])} and G >= 1, "
                f"got {tuple(x.shape)}"
            )
    if k_g.shape[2] != v_g.shape[2]:
        raise ValueError(f"global_kv keys and values must have the same count G, got {k_g.shape[2]} and {v_g.shape[2]}")


def _check_token_param(name: str, value: Any, shape: tuple[int, int, int], q: torch.Tensor) -> None:
    """A per-token parameter: a finite float or a float tensor of its side's ``shape`` (``(B, H, N)`` or
    ``(B, H, Nk)``) on q's device."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if tuple(value.shape) != shape:
            side = "(B, H, Nk)" if "_k" in name else "(B, H, N)"
            raise ValueError(f"{name} must have shape {side} = {shape}, got {tuple(value.shape)}")
        if value.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {value.device}")
        return
    check_float(name, value)
