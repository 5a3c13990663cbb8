"""Every method under every scheme on 2, 3 and 4 gloo processes equals the single-process call on the full
tensors, forward and every gradient: float64 on the torch backend to round-off, fp32 on the Rust kernels within
the project's tolerance. Grids with rows that do not divide by the ranks, text first, last and absent, video."""

from __future__ import annotations

import pytest
import torch

from _cases import CASES, GRIDS, check


def _all_cases(rank: int, world: int) -> None:
    for grid_name in GRIDS:
        for case in CASES:
            check(case, grid_name)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_method_and_scheme_is_exact_in_float64(ranks, world):
    ranks(world).run(_all_cases, timeout=120)


def _rust_cases(rank: int, world: int) -> None:
    for case in CASES:
        check(case, "7x6+5first", dtype=torch.float32, backend="rust")


def test_fp32_rust_kernels_sharded_match_single_process(ranks):
    ranks(3).run(_rust_cases, timeout=120)
