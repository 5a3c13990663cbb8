"""Block plans of the attention engine: built by the compiled core, cached, and seen by the kernels as one typed
object.

A plan lays the query side and the key side out in blocks (a token order ``perm`` and block boundaries
``offsets`` per side: image tiles or groups, text runs), lists the key blocks of each query block as a CSR
(``indptr``, ``indices``, a ``kind`` per entry: 0 full, 1 masked) with its transpose (key block → query blocks,
for the key-side backward) and holds the ``(t, y, x)`` coordinates of each position (text ``-1``, extra keys
``-2``) for the element mask of masked entries: CLEAR's disc ``dy² + dx² <= max_d2``, ``|dt| <= max_dt``.

The ops take a :class:`BlockPlanKey` (everything a plan depends on, as plain numbers that ``torch.compile`` keeps
in the graph) and look the plan up here, so no plan-sized tensor ever appears in a traced graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..._native import core
from ...grid import TokenGrid
from .disc_bits import DiscBits, disc_bits

_CACHE_SIZE = 32


@dataclass(frozen=True)
class BlockShape:
    """Kernel block sizes and image tiles ``(th, tw)`` of the query and key sides."""

    q_tile: tuple[int, int]
    k_tile: tuple[int, int]

    @property
    def q_block(self) -> int:
        return self.q_tile[0] * self.q_tile[1]

    @property
    def k_block(self) -> int:
        return self.k_tile[0] * self.k_tile[1]


# CPU: 64-token blocks on both sides (8x8 tiles); GPU: 128 queries (8x16) against 64 keys (8x8), and 64 queries
# (8x8) for heads wider than WIDE_HEAD_DIM: at D = 256 the backward kernels then need at most 161 KiB of shared
# memory on sm_80 (an A100 allows 163 KiB) instead of up to 225 KiB (tier 1's ahead-of-time compile checks it).
CPU_BLOCKS = BlockShape((8, 8), (8, 8))
GPU_BLOCKS = BlockShape((8, 16), (8, 8))
GPU_BLOCKS_WIDE_HEADS = BlockShape((8, 8), (8, 8))
WIDE_HEAD_DIM = 128
# Block shapes per backend and head-width class (narrow: D <= WIDE_HEAD_DIM).
_BLOCKS = {("rust", False): CPU_BLOCKS, ("rust", True): CPU_BLOCKS,
           ("triton", False): GPU_BLOCKS, ("triton", True): GPU_BLOCKS_WIDE_HEADS}


def kernel_blocks(backend: str, head_dim: int) -> BlockShape:
    """The block shape of ``backend``'s engine (``"rust"`` or ``"triton"``) for heads of ``head_dim`` (the larger
    of D and Dv)."""
    return _BLOCKS[(backend, head_dim > WIDE_HEAD_DIM)]


@dataclass(frozen=True)
class BlockPlanKey:
    """Everything a block plan depends on.

    ``method`` is ``"clear"`` (disc of ``radius``, frames within ``temporal_radius``, ``global_tokens`` extra keys
    after the sequence) or ``"grat"`` (groups of ``group = (gt, gh, gw)``, ``pattern`` ``"neighbors"`` within
    ``reach`` or ``"criss_cross"``, ``text_masked``: text keys get masked entries for a padding mask). ``grid`` is
    ``(frames, height, width, text_tokens, text_position)``.
    """

    method: str
    grid: tuple[int, int, int, int, str]
    blocks: BlockShape
    radius: float = 0.0
    temporal_radius: float = 0.0
    global_tokens: int = 0
    group: tuple[int, int, int] = (1, 1, 1)
    pattern: str = ""
    reach: int = 0
    text_masked: bool = False

    def op_args(self) -> tuple[str, list[int], list[float]]:
        """The key as custom-op arguments ``(kind, ints, floats)`` (symbolic sizes stay symbolic under compile)."""
        frames, height, width, text_tokens, position = self.grid
        kind = f"{self.method}:{self.pattern}:{position}"
        ints = [frames, height, width, text_tokens, *self.blocks.q_tile, *self.blocks.k_tile, self.global_tokens,
                *self.group, self.reach, int(self.text_masked)]
        return kind, ints, [self.radius, self.temporal_radius]

    @staticmethod
    def from_op_args(kind: str, ints: list[int], floats: list[float]) -> BlockPlanKey:
        method, pattern, position = kind.split(":")
        frames, height, width, text_tokens, qh, qw, kh, kw, global_tokens, gt, gh, gw, reach, text_masked = ints
        return BlockPlanKey(method, (frames, height, width, text_tokens, position), BlockShape((qh, qw), (kh, kw)),
                            floats[0], floats[1], global_tokens, (gt, gh, gw), pattern, reach, bool(text_masked))


_FIELDS = ("q_perm", "q_offsets", "k_perm", "k_offsets", "indptr", "indices", "kinds", "t_indptr", "t_indices",
           "t_kinds", "q_coords", "k_coords")
_INT32_FIELDS = ("kinds", "t_kinds", "q_coords", "k_coords")


def _array(name: str) -> property:
    return property(lambda self: self._arrays[name], doc=f"The plan's ``{name}`` on the plan's device.")


class BlockPlan:
    """A block plan, seen from Python: the core's ``difattn._core.BlockPlan`` (``native``, what the Rust kernels
    take as is) and, for the Triton kernels, its arrays as tensors on ``device`` (int64 unless noted):
    ``q_perm``/``k_perm`` ``(N_q,)``/``(N_k,)``, ``q_offsets``/``k_offsets`` (blocks + 1), the CSR ``indptr``,
    ``indices``, ``kinds`` (int32) and its transpose ``t_indptr``, ``t_indices``, ``t_kinds`` (int32),
    ``q_coords``/``k_coords`` (int32, ``(N, 3)`` flattened). Each array is read from the core once, when first
    used. ``max_d2``/``max_dt`` are the element-mask thresholds (``max_d2 < 0``: no disc) and ``max_blocks`` the
    largest query and key block (what a kernel's tiles must hold)."""

    def __init__(self, native, device: torch.device) -> None:
        self.native = native
        self.device = device
        self.max_d2, self.max_dt = native.thresholds
        self.max_blocks = native.max_blocks

    @functools.cached_property
    def _arrays(self) -> dict[str, torch.Tensor]:
        raw = self.native.arrays()
        return {
            name: torch.from_numpy(np.frombuffer(data, dtype="<i4" if name in _INT32_FIELDS else "<i8").copy()).to(
                self.device)
            for name, data in raw.items()
        }

    q_perm, q_offsets, k_perm, k_offsets = (_array(n) for n in _FIELDS[:4])
    indptr, indices, kinds, t_indptr, t_indices, t_kinds = (_array(n) for n in _FIELDS[4:10])
    q_coords, k_coords = _array("q_coords"), _array("k_coords")

    @property
    def num_query_blocks(self) -> int:
        return self.q_offsets.numel() - 1

    @property
    def num_key_blocks(self) -> int:
        return self.k_offsets.numel() - 1

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The twelve arrays in the order the Triton launchers take them."""
        return tuple(self._arrays[name] for name in _FIELDS)

    @functools.cached_property
    def disc_bits(self) -> DiscBits | None:
        """The element mask of the masked entries as bits (:mod:`.disc_bits`; built on first use), ``None`` without
        a disc."""
        return disc_bits(self) if self.max_d2 >= 0 else None

    def computed_pairs(self) -> int:
        """(query, key) pairs the engine computes over this plan (whole blocks)."""
        return self.native.computed_pairs


@functools.lru_cache(maxsize=_CACHE_SIZE)
def block_plan(key: BlockPlanKey, device: torch.device) -> BlockPlan:
    """The plan of ``key`` on ``device``: built once by the compiled core (on any device's first use) and cached."""
    if device.type != "cpu":
        return BlockPlan(block_plan(key, torch.device("cpu")).native, device)
    frames, height, width, text_tokens, position = key.grid
    grid = (frames, height, width, text_tokens, position)
    blocks = key.blocks
    if key.method == "clear":
        native = core().BlockPlan.clear(grid, key.radius, key.temporal_radius, key.global_tokens,
                                        (1, *blocks.q_tile), (1, *blocks.k_tile), blocks.q_block, blocks.k_block)
    else:
        native = core().BlockPlan.grat(grid, key.group, key.pattern, key.reach, key.text_masked, blocks.q_block,
                                       blocks.k_block)
    return BlockPlan(native, device)


def clear_plan_key(grid: TokenGrid, radius: float, temporal_radius: float, global_tokens: int,
                   blocks: BlockShape) -> BlockPlanKey:
    """The key of CLEAR's plan (radii validated by the caller)."""
    return BlockPlanKey("clear", grid.core_args(), blocks, radius=float(radius),
                        temporal_radius=float(temporal_radius), global_tokens=global_tokens)


def grat_plan_key(grid: TokenGrid, group: tuple[int, int, int], pattern: str, reach: int, text_masked: bool,
                  blocks: BlockShape) -> BlockPlanKey:
    """The key of GRAT's plan (options validated by the caller)."""
    return BlockPlanKey("grat", grid.core_args(), blocks, group=tuple(group), pattern=pattern, reach=reach,
                        text_masked=text_masked)


def clear_cache() -> None:
    """Drop every cached plan."""
    block_plan.cache_clear()
