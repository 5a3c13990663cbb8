"""Benchmark support: closed-form work counts equal the masks' pair counts, and the generated reports are
up to date with the committed raw results."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difattn import TokenGrid, reference
from difattn.bench import work
from difattn.ops import block_plan
from difattn.testing.strategies import token_grids

ROOT = Path(__file__).resolve().parent.parent


@given(grid=token_grids(max_side=16, max_tokens=400), radius=st.floats(0.5, 10.0), rt=st.sampled_from([None, 1.0, 2.0]))
def test_clear_pairs_closed_form(grid, radius, rt):
    assert work.clear_pairs(grid, radius, rt) == int(reference.clear_mask(grid, radius, temporal_radius=rt).sum())


@given(grid=token_grids(max_side=16, max_tokens=400), group=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
       pattern=st.sampled_from(["neighbors", "criss_cross"]), reach=st.integers(0, 2))
def test_grat_pairs_closed_form(grid, group, pattern, reach):
    assert work.grat_pairs(grid, group, pattern, reach) == int(reference.grat_mask(grid, group, pattern, reach).sum())


def test_spec_check_values():
    flux = TokenGrid(64, 64, text_tokens=512)
    assert [round(4 * work.clear_pairs(flux, r) * 3072 / 1e9, 1) for r in (8, 16, 32)] == [63.5, 86.6, 154.1]
    big = TokenGrid(512, 512, text_tokens=512)
    image_queries = big.image_tokens * big.num_tokens

    def sparsity(pattern):
        pairs = work.grat_pairs(big, (16, 16), pattern, 1) - big.text_tokens * big.num_tokens  # image queries only
        return 100 * (1 - pairs / image_queries)

    assert round(sparsity("criss_cross"), 3) == 93.665
    assert round(sparsity("neighbors"), 2) == 98.96


def test_plan_pairs_cover_needed_pairs():
    grid = TokenGrid(30, 52, text_tokens=77, text_position="last")
    plan = block_plan.clear_plan(grid, 8.0, 1.0, 0, block_plan.CPU_BLOCKS, "cpu")
    assert work.plan_pairs(plan) >= work.clear_pairs(grid, 8.0)


def test_generated_reports_are_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
