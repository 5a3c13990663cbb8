"""Counting the bytes each collective moves on this rank (what ``difattn bench --world-size`` reports).

Inside ``with counting() as traffic:`` every collective of :mod:`._comm` adds one :class:`Transfer`. Conventions
(per rank, forward pass; an autograd backward moves the mirror image of each transfer):

- all-to-all (and the uneven all-gather built on it): the bytes of the pieces addressed to other ranks (``sent``)
  and received from them; a rank's piece for itself is never sent;
- all-reduce of ``S`` bytes: ``2 (P - 1) / P * S`` sent and received, the traffic of the bandwidth-optimal
  (ring / reduce-scatter + all-gather) algorithm; ``payload`` records ``S`` itself.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class Transfer:
    op: str
    sent: int
    received: int
    payload: int


@dataclass
class Traffic:
    transfers: list[Transfer] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(t.sent for t in self.transfers)

    @property
    def received(self) -> int:
        return sum(t.received for t in self.transfers)

    @property
    def calls(self) -> int:
        return len(self.transfers)


_ACTIVE: contextvars.ContextVar[Traffic | None] = contextvars.ContextVar("difattn_traffic", default=None)


@contextlib.contextmanager
def counting() -> Iterator[Traffic]:
    """Count the collectives run inside the block (nested blocks each count their own)."""
    traffic = Traffic()
    token = _ACTIVE.set(traffic)
    try:
        yield traffic
    finally:
        _ACTIVE.reset(token)


def record(op: str, sent: int, received: int, payload: int) -> None:
    traffic = _ACTIVE.get()
    if traffic is not None:
        traffic.transfers.append(Transfer(op, sent, received, payload))


def all_reduce_bytes(payload: int, world: int) -> int:
    """Bytes a rank sends (and receives) in a bandwidth-optimal all-reduce of ``payload`` bytes."""
    return 2 * (world - 1) * payload // world
