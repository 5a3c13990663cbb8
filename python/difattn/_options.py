"""Method options: validation and the defaults the specs define.

Shared by the public functions (which validate) and the references (which resolve defaults the same way).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._checks import F32_MAX, F32_TINY, check_choice, check_float, check_int
from .grid import TokenGrid

GRAT_PATTERNS = ("neighbors", "criss_cross")
PISA_ORDERS = ("zeroth", "hybrid", "first")
PISA_SINKS = (None, "first", "last")
# Routing biases by name (``routing_bias=True`` is "centered", ``False`` none); see :func:`pisa_routing_bias`.
PISA_ROUTING_BIASES = ("centered", "uncentered", "key_variance")
LLSA_MAX_COARSE_TOKENS = 256  # default levels: smallest L with N / B**L <= 256
LLSA_POOLINGS = ("children", "tokens")


def clear_radii(grid: TokenGrid, radius: Any, temporal_radius: Any) -> tuple[float, float]:
    """``(r, rt)``: spatial disc radius and temporal radius (each > 0 and finite; ``rt`` defaults to
    ``grid.frames``: every frame).

    A radius beyond the grid's reach is clamped to the smallest one that already covers the whole grid, which gives
    exactly the same mask: ``isqrt((height-1)² + (width-1)²) + 1`` for ``r`` (strictly above the grid's diagonal)
    and ``frames`` for ``rt``. Every threshold derived from them is then a small integer.
    """
    r = check_float("radius", radius, greater_than=0.0)
    reach_d2 = (grid.height - 1) ** 2 + (grid.width - 1) ** 2
    if r * r > reach_d2:  # compared first: under torch.compile the sides may be symbolic, which isqrt cannot take
        r = min(r, float(math.isqrt(reach_d2) + 1))
    if temporal_radius is None:
        return r, float(grid.frames)
    return r, min(check_float("temporal_radius", temporal_radius, greater_than=0.0), float(grid.frames))


def clear_thresholds(radius: float, temporal_radius: float) -> tuple[int, int]:
    """``(max_d2, max_dt)``: integer bounds of CLEAR's mask, ``dy² + dx² <= max_d2`` and ``|dt| <= max_dt``, the
    largest integers strictly below ``r²`` and ``rt`` (``dy² + dx² < r²`` on integer offsets). Radii are > 0, so
    both are >= 0 (a query always sees itself), even where ``r²`` underflows to 0."""
    return max(math.ceil(radius * radius) - 1, 0), max(math.ceil(temporal_radius) - 1, 0)


# The sequence length the released CLEAR processors scale from under proportional attention: FLUX at 1024² (a 64x64
# latent grid) with 512 text tokens, the resolution it was trained at.
CLEAR_TRAIN_TOKENS = 64 * 64 + 512
# Under proportional attention with global tokens the released processor takes log(10·N), without them log(N).
CLEAR_GLOBAL_TOKEN_FACTOR = 10


def clear_proportional(proportional_attention: Any) -> int | None:
    """``proportional_attention`` as the training sequence length ``T`` it scales from: ``False`` → None, ``True`` →
    :data:`CLEAR_TRAIN_TOKENS`, or an int ``T >= 2``."""
    if proportional_attention is False:
        return None
    if proportional_attention is True:
        return CLEAR_TRAIN_TOKENS
    if not isinstance(proportional_attention, int):
        raise TypeError("proportional_attention must be a bool or the training sequence length (an int), got "
                        f"{type(proportional_attention).__name__}")
    return check_int("proportional_attention", proportional_attention, minimum=2)


def clear_proportional_scale(num_tokens: int, head_dim: int, train_tokens: int, global_tokens: bool) -> float:
    """CLEAR's proportional attention (its high-resolution inference): ``scale = sqrt(log_T(c·N) / D)`` for a call of
    N tokens (text and image, before any global token), ``T = train_tokens``; ``c = 10`` with global tokens and 1
    without, as the released processors with and without them compute it. At ``N = T`` (and no global tokens) it is
    the usual ``D**-0.5``; longer sequences sharpen the softmax as their logits' spread grows."""
    factor = CLEAR_GLOBAL_TOKEN_FACTOR if global_tokens else 1
    return math.sqrt(math.log(factor * num_tokens) / math.log(train_tokens) / head_dim)


def grat_text_mask(text_mask: Any, batch: int, grid: TokenGrid, device: torch.device) -> torch.Tensor | None:
    """GRAT's valid text keys as a ``(B, T)`` bool mask (None: every text token is valid).

    ``text_mask`` is that mask, or (the released code's form) the attendable text count of each sample, an integer
    tensor ``(B,)`` with ``0 <= n_b <= T``: sample b's first ``n_b`` text tokens (in sequence order) are valid,
    ``mask[b, t] = t < n_b``. Either is on ``device``.
    """
    if text_mask is None:
        return None
    if not isinstance(text_mask, torch.Tensor):
        raise TypeError(f"text_mask must be a bool (B, T) or integer (B,) torch.Tensor, got {type(text_mask).__name__}")
    if text_mask.device != device:
        raise ValueError(f"text_mask must be on q's device ({device}), got {text_mask.device}")
    if text_mask.dtype == torch.bool:
        if tuple(text_mask.shape) != (batch, grid.text_tokens):
            raise ValueError(
                f"text_mask must have shape (B, T) = {(batch, grid.text_tokens)}, got {tuple(text_mask.shape)}"
            )
        return text_mask
    if text_mask.is_floating_point() or text_mask.is_complex():
        raise TypeError(f"text_mask must have dtype torch.bool (a mask) or an integer dtype (counts), got "
                        f"{text_mask.dtype}")
    if tuple(text_mask.shape) != (batch,):
        raise ValueError(f"text_mask as counts must have shape (B,) = ({batch},), got {tuple(text_mask.shape)}")
    if bool(((text_mask < 0) | (text_mask > grid.text_tokens)).any()):
        raise ValueError(f"text_mask counts must lie in [0, T] = [0, {grid.text_tokens}], got {text_mask.tolist()}")
    return torch.arange(grid.text_tokens, device=device) < text_mask[:, None]


def grat_group(grid: TokenGrid, group: Any) -> tuple[int, int, int]:
    """The group as ``(gt, gh, gw)``.

    ``None`` means 16x16 on images and 4x8x8 on videos (the paper's FLUX and HunyuanVideo settings); a pair
    ``(gh, gw)`` means ``gt = 1``.
    """
    if group is None:
        return (1, 16, 16) if grid.frames == 1 else (4, 8, 8)
    if not isinstance(group, (tuple, list)) or len(group) not in (2, 3):
        raise TypeError(f"group must be a tuple (gh, gw) or (gt, gh, gw) of ints, got {group!r}")
    sizes = tuple(check_int(f"group[{i}]", g, minimum=1) for i, g in enumerate(group))
    return sizes if len(sizes) == 3 else (1, sizes[0], sizes[1])


def pisa_tile(block_size: int) -> tuple[int, int]:
    """Image tile ``(th, tw)`` of a PISA block: ``th = 2**floor(log2(b)/2)``, ``tw = b / th``."""
    th = 2 ** (int(math.log2(block_size)) // 2)
    if block_size % th:
        raise ValueError(
            f"block_size={block_size} cannot be tiled with a grid: it must be divisible by "
            f"th = 2**floor(log2(block_size)/2) = {th} (use a power of two such as 64 or 128)"
        )
    return th, block_size // th


def pisa_num_blocks(grid: TokenGrid | None, num_tokens: int, block_size: int) -> int:
    """M: runs of ``block_size`` tokens without a grid; with one, ``ceil(T / b)`` text blocks plus one block per
    ``th x tw`` image tile per frame."""
    if grid is None:
        return -(-num_tokens // block_size)
    th, tw = pisa_tile(block_size)
    return -(-grid.text_tokens // block_size) + grid.frames * -(-grid.height // th) * -(-grid.width // tw)


def pisa_num_selected(density: float, num_blocks: int) -> int:
    """Exact key blocks per query block: ``k = max(1, floor(density * M))``. A symbolic ``M`` (``torch.compile``
    with dynamic shapes) stays symbolic: ``sym_int`` truncates, the floor of a positive product."""
    if isinstance(num_blocks, int):
        return max(1, math.floor(density * num_blocks))
    return torch.sym_max(1, torch.sym_int(density * num_blocks))


def pisa_routing_bias(routing_bias: Any) -> str | None:
    """The routing bias by name: ``False`` (or None) → None, ``True`` → ``"centered"``, or one of
    :data:`PISA_ROUTING_BIASES`."""
    if routing_bias is None:
        return None
    if isinstance(routing_bias, bool):
        return "centered" if routing_bias else None
    names = ", ".join(map(repr, PISA_ROUTING_BIASES))
    if not isinstance(routing_bias, str):
        raise TypeError(f"routing_bias must be a bool or one of {names}, got {type(routing_bias).__name__}")
    if routing_bias not in PISA_ROUTING_BIASES:
        raise ValueError(f"routing_bias must be False, True or one of {names}; got {routing_bias!r}")
    return routing_bias


def check_pisa(density: Any, block_size: Any, order: Any, routing_bias: Any, sink: Any) -> str | None:
    """Validates PISA's options; returns the routing bias by name (:func:`pisa_routing_bias`)."""
    check_float("density", density, greater_than=0.0, at_most=1.0)
    check_int("block_size", block_size, minimum=1)
    check_choice("order", order, PISA_ORDERS)
    bias = pisa_routing_bias(routing_bias)
    check_choice("sink", sink, PISA_SINKS)
    return bias


def check_pisa_blocks(blocks: Any, shape: tuple[int, int, int, int], num_key_blocks: int,
                      device: torch.device) -> torch.Tensor:
    """A given PISA selection: an int64 tensor of ``shape = (B, H, M, k)`` on ``device`` holding key-block ids in
    ``[0, num_key_blocks)``, no id twice in a query block's row. Returns it contiguous."""
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.int64:
        raise TypeError(f"blocks must be an int64 torch.Tensor of shape (B, H, M, k) = {shape}, got {blocks!r:.80}")
    if tuple(blocks.shape) != shape:
        raise ValueError(f"blocks must have shape (B, H, M, k) = {shape} (k = max(1, floor(density * M))), got "
                         f"{tuple(blocks.shape)}")
    if blocks.device != device:
        raise ValueError(f"blocks must be on the device of q ({device}), got {blocks.device}")
    ascending = blocks.sort(dim=-1).values
    low, high = int(ascending[..., 0].min()), int(ascending[..., -1].max())
    if low < 0 or high >= num_key_blocks:
        raise ValueError(f"blocks must hold key block ids in [0, {num_key_blocks}), got values in [{low}, {high}]")
    if bool((ascending[..., 1:] == ascending[..., :-1]).any()):
        raise ValueError("blocks must not repeat a block id within a query block's selection")
    return blocks.contiguous()


def llsa_default_levels(num_tokens: int, block_size: int) -> int:
    """Smallest ``L >= 1`` with ``N / B**L <= 256``."""
    levels = 1
    while num_tokens > LLSA_MAX_COARSE_TOKENS * block_size**levels:
        levels += 1
    return levels


def llsa_top_level(num_tokens: int, block_size: int) -> int:
    """The first level that holds a single token (at least 1): coarser levels would repeat it."""
    levels, size = 1, -(-num_tokens // block_size)
    while size > 1:
        levels, size = levels + 1, -(-size // block_size)
    return levels


def llsa_level_sizes(num_tokens: int, block_size: int, levels: int) -> list[int]:
    """Tokens per level ``[n_0 = N, n_1, ..., n_L]`` with ``n_l = ceil(n_{l-1} / B)``."""
    sizes = [num_tokens]
    for _ in range(levels):
        sizes.append(-(-sizes[-1] // block_size))
    return sizes


def llsa_min_candidates(level_sizes: list[int], block_size: int, level: int, parent_topk: int) -> int:
    """Fewest level-``level`` candidates any query can get: children of its parent's ``parent_topk`` choices."""
    n_child, n_parent = level_sizes[level], level_sizes[level + 1]
    if parent_topk >= n_parent:
        return n_child
    last_children = n_child - (n_parent - 1) * block_size
    return min((parent_topk - 1) * block_size + last_children, parent_topk * block_size)


def llsa_config(num_tokens: int, block_size: Any, topk: Any, levels: Any) -> tuple[int, tuple[int, ...]]:
    """Validated ``(L, (K_1, ..., K_L))``; raises where a top-K exceeds the keys it chooses from."""
    block_size = check_int("block_size", block_size, minimum=2)
    if levels is None:
        levels = llsa_default_levels(num_tokens, block_size)
    levels = check_int("levels", levels, minimum=1)
    most = llsa_top_level(num_tokens, block_size)
    if levels > most:
        raise ValueError(
            f"levels must be <= {most}: with N={num_tokens} and block_size={block_size}, level {most} already holds "
            f"a single token; got {levels}"
        )
    if isinstance(topk, (tuple, list)):
        if len(topk) != levels:
            raise ValueError(f"topk must have one entry per level ({levels}), got {len(topk)}: {tuple(topk)}")
        ks = tuple(check_int(f"topk[{i}]", t, minimum=1) for i, t in enumerate(topk))
    else:
        ks = (check_int("topk", topk, minimum=1),) * levels
    sizes = llsa_level_sizes(num_tokens, block_size, levels)
    if ks[-1] > sizes[levels]:
        raise ValueError(
            f"topk at the coarsest level ({ks[-1]}) exceeds its {sizes[levels]} tokens "
            f"(N={num_tokens}, block_size={block_size}, levels={levels}); lower topk or levels"
        )
    for level in range(levels - 1, 0, -1):
        fewest = llsa_min_candidates(sizes, block_size, level, ks[level])
        if ks[level - 1] > fewest:
            raise ValueError(
                f"topk at level {level} ({ks[level - 1]}) exceeds the {fewest} candidates a query block can have "
                f"there (children of {ks[level]} chosen level-{level + 1} tokens, N={num_tokens}, "
                f"block_size={block_size}); lower topk"
            )
    return levels, ks


def llsa_pooling(coarse_pooling: Any) -> str:
    """``"children"`` (level l is the plain mean of its level-(l−1) children) or ``"tokens"`` (the count-weighted
    mean of the fine tokens under it)."""
    if not isinstance(coarse_pooling, str):
        raise TypeError(f"coarse_pooling must be a str, got {type(coarse_pooling).__name__}")
    return check_choice("coarse_pooling", coarse_pooling, LLSA_POOLINGS)


def llsa_token_weight(token_weight: Any, levels: int) -> tuple[float, ...] | None:
    """``(w_1, ..., w_L)`` from a positive float (every level) or one per level, or None (the counts)."""
    if token_weight is None:
        return None
    if isinstance(token_weight, (tuple, list)):
        if len(token_weight) != levels:
            raise ValueError(f"token_weight must have one entry per level ({levels}), got {len(token_weight)}: "
                             f"{tuple(token_weight)}")
        return tuple(check_float(f"token_weight[{i}]", w, greater_than=0.0) for i, w in enumerate(token_weight))
    return (check_float("token_weight", token_weight, greater_than=0.0),) * levels


def check_llsa_indices(indices: Any, shapes: list[tuple[int, int, int, int]],
                       device: torch.device) -> list[torch.Tensor]:
    """A given LLSA selection ``[I_1, ..., I_L]``: ``I_l`` int64 of ``shapes[l-1] = (B, H, n_l, K_l)`` on ``device``,
    level-l ids in ``[0, n_l)``, no id twice in a row. Returns the tensors contiguous."""
    if not isinstance(indices, (list, tuple)) or len(indices) != len(shapes):
        raise TypeError(f"indices must be a list [I_1, ..., I_L] of {len(shapes)} int64 tensors, got {indices!r:.80}")
    checked = []
    for level, (ids, shape) in enumerate(zip(indices, shapes), 1):
        name = f"indices[{level - 1}] (I_{level})"
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 torch.Tensor of shape {shape}, got {ids!r:.80}")
        if tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have shape (B, H, n_{level}, K_{level}) = {shape}, got {tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"{name} must be on the device of q ({device}), got {ids.device}")
        ascending = ids.sort(dim=-1).values
        low, high = int(ascending[..., 0].min()), int(ascending[..., -1].max())
        if low < 0 or high >= shape[2]:
            raise ValueError(f"{name} must hold level-{level} ids in [0, {shape[2]}), got values in [{low}, {high}]")
        if bool((ascending[..., 1:] == ascending[..., :-1]).any()):
            raise ValueError(f"{name} must not repeat an id within a row")
        checked.append(ids.contiguous())
    return checked


def check_linear(normalize: Any, eps: Any) -> float:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return check_float("eps", eps, greater_than=0.0, at_least=F32_TINY, at_most=F32_MAX)
