"""``shard`` and ``gather``: between a full tensor (the same on every rank) and this rank's part of it."""

from __future__ import annotations

from typing import Any

import torch

from ..grid import TokenGrid
from ._comm import Comm
from ._layout import Layout


def layout_of(grid: TokenGrid | None, world: int, num_tokens: int | None = None) -> Layout:
    """difattn's layout for ``grid`` (image row stripes), or balanced runs of a plain ``num_tokens`` sequence."""
    if grid is None:
        return Layout.sequence(num_tokens, world)
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a difattn.TokenGrid or None, got {type(grid).__name__}")
    return Layout.stripes(grid, world)


def _token_dim(x: Any, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be an int in [{-x.dim()}, {x.dim()}) for a tensor of shape {tuple(x.shape)}, got {dim}"
        )
    return dim % x.dim()


def shard(x: torch.Tensor, grid: TokenGrid | None, *, process_group: Any = None, dim: int = -2) -> torch.Tensor:
    """This rank's part of the full tensor ``x``, whose dim ``dim`` holds the ``grid.num_tokens`` tokens.

    ``x`` is ``(B, H, N, D)`` or ``(B, N, C)`` (tokens at dim -2, the default), or ``(B, H, N)`` per-token values
    with ``dim=-1``. The layout (see :mod:`difattn.distributed`): this rank's stripe of image rows of every frame
    and its run of the text, in the grid's order; ``grid=None`` takes a balanced contiguous run of the sequence.
    Differentiable (the gradient of ``x`` is zero outside this rank's tokens; sum it over the group).
    """
    dim = _token_dim(x, dim)
    comm = Comm(process_group)
    layout = layout_of(grid, comm.world, x.shape[dim])
    if x.shape[dim] != layout.num_tokens:
        raise ValueError(f"x has {x.shape[dim]} tokens at dim {dim}, but grid describes {layout.num_tokens}")
    return x.index_select(dim, layout.indices(comm.rank, x.device))


def gather(x_local: torch.Tensor, grid: TokenGrid | None, *, process_group: Any = None, dim: int = -2) -> torch.Tensor:
    """The full tensor from every rank's ``shard``, on every rank (the inverse of :func:`shard`).

    Differentiable for what follows being the same on every rank (a replicated loss): the backward returns this
    rank's part of the gradient without communication, so that, as after :func:`shard`, gradients of replicated
    parameters are partial sums over the group.
    """
    dim = _token_dim(x_local, dim)
    comm = Comm(process_group)
    if grid is None:
        counts = comm.all_gather(torch.tensor([x_local.shape[dim]], device=x_local.device), [(1,)] * comm.world)
        layout = Layout.sequence(int(torch.cat(counts).sum()), comm.world)
    else:
        layout = layout_of(grid, comm.world)
    if x_local.shape[dim] != layout.count(comm.rank):
        raise ValueError(
            f"x_local has {x_local.shape[dim]} tokens at dim {dim}, but this rank's shard of the grid holds "
            f"{layout.count(comm.rank)}"
        )
    return _Gather.apply(x_local, dim, layout, comm)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local: torch.Tensor, dim: int, layout: Layout, comm: Comm) -> torch.Tensor:
        ctx.dim, ctx.index = dim, layout.indices(comm.rank, x_local.device)
        shapes = [x_local.shape[:dim] + (layout.count(s),) + x_local.shape[dim + 1 :] for s in range(comm.world)]
        pieces = comm.all_gather(x_local.contiguous(), shapes)
        return torch.cat(pieces, dim).index_select(dim, layout.to_full(x_local.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(ctx.dim, ctx.index), None, None, None
