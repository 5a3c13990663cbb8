"""The collectives every scheme uses, on torch's functional collectives (autograd-aware, traceable, gloo and NCCL).

:class:`Comm` wraps a process group: an uneven all-to-all of lists of tensors (the Ulysses transposes, halo rows,
text exchanges), an uneven all-gather built on it, and a sum all-reduce. The all-to-all and all-reduce are
``torch.distributed._functional_collectives`` ops, whose registered autograd formulas send gradients back the way
the data came (reversed splits; a second all-reduce), so every scheme is differentiable without custom backward
code. Each call is recorded by :mod:`._traffic`. :class:`DryComm` runs the same code on ``meta`` tensors without a
process group, to count the bytes of sizes too large to run here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import _traffic

Shape = Sequence[int]


def resolve_group(process_group: Any) -> Any:
    """A ``ProcessGroup`` from ``None`` (the default group), a group, or a one-dimensional ``DeviceMesh``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("difattn.distributed needs torch.distributed initialised (dist.init_process_group)")
    if process_group is None:
        return dist.group.WORLD
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    device_mesh = getattr(dist, "device_mesh", None)
    if device_mesh is not None and isinstance(process_group, device_mesh.DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"process_group: a DeviceMesh must be one-dimensional, got {process_group.ndim} dims")
        return process_group.get_group()
    raise TypeError(
        f"process_group must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(process_group).__name__}"
    )


class SharedGroup:
    """A process group held by a module; copies of the module share it (``copy.deepcopy`` of a model, as EMA
    training does, cannot copy a ``ProcessGroup``)."""

    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> "SharedGroup":
        return self


class Comm:
    """This rank's view of a process group; ``rank`` and ``world`` are group-local."""

    def __init__(self, process_group: Any = None) -> None:
        self.group = resolve_group(process_group)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)

    def all_to_all(
        self, send: Sequence[torch.Tensor | None], recv_shapes: Sequence[Shape | None]
    ) -> list[torch.Tensor | None]:
        """Send ``send[s]`` to rank s and receive a tensor of ``recv_shapes[s]`` from it (None: nothing).

        Every tensor has one dtype and device. ``send[rank]`` is returned as this rank's own piece without being
        sent (``recv_shapes[rank]`` is ignored). Differentiable in every sent tensor.
        """
        own = send[self.rank]
        if own is None:
            raise ValueError("all_to_all: this rank's own piece must be a tensor (possibly empty)")
        in_splits = [0 if s == self.rank or x is None else x.numel() for s, x in enumerate(send)]
        out_splits = [0 if s == self.rank or shape is None else math.prod(shape) for s, shape in enumerate(recv_shapes)]
        # A rank that sends nothing still sends an empty slice of its own piece, and one that receives nothing adds
        # an empty sum of what it receives to its own piece: so every rank's autograd graph holds the collective and
        # every rank joins the mirrored all-to-all of the backward pass (one missing would leave the others waiting).
        pieces = [x.reshape(-1) for s, x in enumerate(send) if in_splits[s]] or [own.reshape(-1)[:0]]
        flat = torch.cat(pieces)
        itemsize = flat.element_size()
        _traffic.record("all_to_all", sum(in_splits) * itemsize, sum(out_splits) * itemsize, sum(in_splits) * itemsize)
        received = self._exchange(flat, out_splits, in_splits)
        if all(shape is None for s, shape in enumerate(recv_shapes) if s != self.rank):
            own = own + received[:0].sum().to(own.dtype)
        pieces = received.split(out_splits)
        return [
            own if s == self.rank else None if recv_shapes[s] is None else pieces[s].view(tuple(recv_shapes[s]))
            for s in range(self.world)
        ]

    def all_gather(self, x: torch.Tensor, shapes: Sequence[Shape]) -> list[torch.Tensor]:
        """Every rank's tensor (``shapes[s]`` is rank s's shape; they may differ); differentiable."""
        return self.all_to_all([x] * self.world, shapes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group, on every rank; differentiable (the gradient is all-reduced too)."""
        payload = x.numel() * x.element_size()
        moved = _traffic.all_reduce_bytes(payload, self.world)
        _traffic.record("all_reduce", moved, moved, payload)
        return self._sum(x.contiguous())

    def _exchange(self, flat: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        return _waited(funcol.all_to_all_single(flat, out_splits, in_splits, self.group))

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return _waited(funcol.all_reduce(x, "sum", self.group))


class DryComm(Comm):
    """Rank ``rank`` of ``world`` without a process group: collectives return uninitialised ``meta`` tensors of the
    right sizes and are counted like real ones. For byte counts of sizes that cannot run here."""

    def __init__(self, rank: int, world: int) -> None:
        self.group, self.rank, self.world = None, rank, world

    def _exchange(self, flat: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        return torch.empty(sum(out_splits), dtype=flat.dtype, device="meta")

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _waited(x: torch.Tensor) -> torch.Tensor:
    """The collective's result as a plain tensor (eager functional collectives return a lazily waited wrapper)."""
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x
