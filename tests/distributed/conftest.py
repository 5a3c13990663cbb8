"""One pool of gloo processes per world size for the whole session (see ``_harness.py``)."""

from __future__ import annotations

import pytest

from _harness import Ranks


@pytest.fixture(scope="session")
def ranks():
    pools: dict[int, Ranks] = {}

    def get(world: int) -> Ranks:
        if world not in pools:
            pools[world] = Ranks(world)
        return pools[world]

    yield get
    for pool in pools.values():
        pool.close()
