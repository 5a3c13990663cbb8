"""Block plans for the attention engine (CLEAR, GRAT), built by the compiled core and cached.

A plan is a list of tensors in a fixed order (``PLAN_FIELDS``) so it can travel through ``torch.library`` ops:
token orders and block boundaries of the query and key sides, the CSR of key blocks per query block with a kind
per entry (0 full, 1 masked), its transpose (key block → query blocks, for the key-side backward) and the
``(t, y, x)`` coordinates of each position (text ``-1``, extra keys ``-2``) for the element mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .._native import core
from ..grid import TokenGrid

PLAN_FIELDS = (
    "q_perm", "q_offsets", "k_perm", "k_offsets", "indptr", "indices", "kinds",
    "t_indptr", "t_indices", "t_kinds", "q_coords", "k_coords",
)
_INT32_FIELDS = ("kinds", "t_kinds", "q_coords", "k_coords")
_CACHE_SIZE = 32


@dataclass(frozen=True)
class BlockShape:
    """Kernel block sizes and image tiles of the query and key sides."""

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
KERNEL_BLOCKS = {"rust": CPU_BLOCKS, "triton": GPU_BLOCKS}
WIDE_HEAD_DIM = 128


def kernel_blocks(kernel: str, head_dim: int) -> BlockShape:
    """The block shape of ``kernel`` (``"rust"`` or ``"triton"``) for heads of ``head_dim`` (the larger of D, Dv)."""
    if kernel == "triton" and head_dim > WIDE_HEAD_DIM:
        return GPU_BLOCKS_WIDE_HEADS
    return KERNEL_BLOCKS[kernel]


@dataclass(frozen=True)
class BlockPlan:
    """Plan tensors (``PLAN_FIELDS`` order), the element-mask thresholds (``max_d2 < 0``: no disc) and the
    largest query and key block (what a kernel's tiles must hold)."""

    tensors: tuple[torch.Tensor, ...]
    max_d2: int
    max_dt: int
    max_blocks: tuple[int, int]

    def field(self, name: str) -> torch.Tensor:
        return self.tensors[PLAN_FIELDS.index(name)]

    @property
    def num_query_blocks(self) -> int:
        return self.field("q_offsets").numel() - 1

    @property
    def num_key_blocks(self) -> int:
        return self.field("k_offsets").numel() - 1


def _plan(arrays: dict[str, bytes], max_d2: int, max_dt: int, device: str) -> BlockPlan:
    cpu = {}
    for name in PLAN_FIELDS:
        dtype = "<i4" if name in _INT32_FIELDS else "<i8"
        cpu[name] = torch.from_numpy(np.frombuffer(arrays[name], dtype=dtype).copy())
    max_blocks = (int(cpu["q_offsets"].diff().max()), int(cpu["k_offsets"].diff().max()))
    return BlockPlan(tuple(cpu[name].to(device) for name in PLAN_FIELDS), max_d2, max_dt, max_blocks)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def clear_plan(grid: TokenGrid, radius: float, temporal_radius: float, global_tokens: int, blocks: BlockShape,
               device: str) -> BlockPlan:
    """CLEAR's plan for ``grid`` on ``device`` (cached by every argument)."""
    arrays, max_d2, max_dt = core().clear_plan(
        grid.core_args(), radius, temporal_radius, global_tokens, (1, *blocks.q_tile), (1, *blocks.k_tile),
        blocks.q_block, blocks.k_block,
    )
    return _plan(arrays, max_d2, max_dt, device)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def grat_plan(grid: TokenGrid, group: tuple[int, int, int], pattern: str, reach: int, text_masked: bool,
              blocks: BlockShape, device: str) -> BlockPlan:
    """GRAT's plan for ``grid`` on ``device`` (cached by every argument)."""
    arrays = core().grat_plan(grid.core_args(), group, pattern, reach, text_masked, blocks.q_block, blocks.k_block)
    return _plan(arrays, -1, 0, device)


def max_below(bound: float) -> int:
    """The largest integer strictly below ``bound`` (−1 when ``bound <= 0``): CLEAR's element-mask thresholds
    (``dy² + dx² <= max_below(r²)``, ``|dt| <= max_below(rt)``), as the core computes them."""
    return -1 if bound <= 0 else math.ceil(bound) - 1


# The plans as custom ops, for the attention code: torch.compile cannot trace into the compiled core, but it keeps
# a custom op in the graph (fullgraph) and sizes its outputs with the fake implementation, which builds the real
# (cached) plan when the grid is static and gives data-dependent sizes when it is symbolic. The thresholds come
# from the options and ``max_blocks`` from the block shape (plans never hold a larger block), so nothing on the
# traced path reads plan values.
@torch.library.custom_op("difattn::clear_plan", mutates_args=())
def _clear_plan_op(frames: int, height: int, width: int, text_tokens: int, text_position: str, radius: float,
                   temporal_radius: float, global_tokens: int, q_tile: list[int], k_tile: list[int],
                   device: torch.device) -> list[torch.Tensor]:
    grid = TokenGrid(height, width, frames=frames, text_tokens=text_tokens, text_position=text_position)
    plan = clear_plan(grid, radius, temporal_radius, global_tokens, BlockShape(tuple(q_tile), tuple(k_tile)),
                      str(device))
    return [t.clone() for t in plan.tensors]  # fresh outputs: a compiled graph may reuse an op's output buffers


@_clear_plan_op.register_fake
def _(frames, height, width, text_tokens, text_position, radius, temporal_radius, global_tokens, q_tile, k_tile,
      device):
    def build():
        grid = TokenGrid(height, width, frames=frames, text_tokens=text_tokens, text_position=text_position)
        return clear_plan(grid, radius, temporal_radius, global_tokens, BlockShape(tuple(q_tile), tuple(k_tile)), "cpu")

    return _fake_plan(build, (frames, height, width, text_tokens, global_tokens), device)


@torch.library.custom_op("difattn::grat_plan", mutates_args=())
def _grat_plan_op(frames: int, height: int, width: int, text_tokens: int, text_position: str, group: list[int],
                  pattern: str, reach: int, text_masked: bool, q_tile: list[int], k_tile: list[int],
                  device: torch.device) -> list[torch.Tensor]:
    grid = TokenGrid(height, width, frames=frames, text_tokens=text_tokens, text_position=text_position)
    plan = grat_plan(grid, tuple(group), pattern, reach, text_masked, BlockShape(tuple(q_tile), tuple(k_tile)),
                     str(device))
    return [t.clone() for t in plan.tensors]


@_grat_plan_op.register_fake
def _(frames, height, width, text_tokens, text_position, group, pattern, reach, text_masked, q_tile, k_tile, device):
    def build():
        grid = TokenGrid(height, width, frames=frames, text_tokens=text_tokens, text_position=text_position)
        return grat_plan(grid, tuple(group), pattern, reach, text_masked, BlockShape(tuple(q_tile), tuple(k_tile)),
                         "cpu")

    return _fake_plan(build, (frames, height, width, text_tokens, *group), device)


def _fake_plan(build, sizes: tuple, device: torch.device) -> list[torch.Tensor]:
    """Outputs of the plan ops while tracing: the real plan's shapes for a static grid, else unbacked lengths."""
    dtypes = [torch.int32 if name in _INT32_FIELDS else torch.int64 for name in PLAN_FIELDS]
    if all(isinstance(s, int) for s in sizes):
        return [torch.empty(t.shape, dtype=t.dtype, device=device) for t in build().tensors]
    ctx = torch.library.get_ctx()
    return [torch.empty(ctx.new_dynamic_size(), dtype=dtype, device=device) for dtype in dtypes]


def traced_clear_plan(grid: TokenGrid, radius: float, temporal_radius: float, global_tokens: int,
                      blocks: BlockShape, device: torch.device) -> BlockPlan:
    """:func:`clear_plan` through its custom op (what the attention code calls: torch.compile traces it)."""
    tensors = torch.ops.difattn.clear_plan(
        grid.frames, grid.height, grid.width, grid.text_tokens, grid.text_position, radius, temporal_radius,
        global_tokens, list(blocks.q_tile), list(blocks.k_tile), device,
    )
    return BlockPlan(tuple(tensors), max_below(radius * radius), max_below(temporal_radius),
                     (blocks.q_block, blocks.k_block))


def traced_grat_plan(grid: TokenGrid, group: tuple[int, int, int], pattern: str, reach: int, text_masked: bool,
                     blocks: BlockShape, device: torch.device) -> BlockPlan:
    """:func:`grat_plan` through its custom op (what the attention code calls: torch.compile traces it)."""
    tensors = torch.ops.difattn.grat_plan(
        grid.frames, grid.height, grid.width, grid.text_tokens, grid.text_position, list(group), pattern, reach,
        text_masked, list(blocks.q_tile), list(blocks.k_tile), device,
    )
    return BlockPlan(tuple(tensors), -1, 0, (blocks.q_block, blocks.k_block))


def clear_cache() -> None:
    clear_plan.cache_clear()
    grat_plan.cache_clear()
