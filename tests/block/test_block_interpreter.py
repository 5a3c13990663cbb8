"""Tier 1: the Triton block-attention kernels under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16, tiny shapes),
forward and every gradient against the torch reference."""

import math
import os

import pytest
import torch

import difattn
from difattn import reference
from difattn.testing import compare_with_reference, random_qkv

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("tier 1 needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    (difattn.TokenGrid(5, 9, text_tokens=3), torch.float32, 24),
    (difattn.TokenGrid(4, 6, frames=2, text_tokens=2, text_position="last"), torch.float16, 40),
    (difattn.TokenGrid(9, 17, text_tokens=3), torch.float16, 136),  # wide heads: the 64-query GPU blocks
]


@pytest.mark.parametrize("grid, dtype, d", CASES)
def test_clear_triton_matches_reference(grid, dtype, d):
    q, k, v = random_qkv(1, 1, grid.num_tokens, d, dtype=dtype, device=DEVICE, seed=1, token_major=True)
    compare_with_reference(
        "clear triton",
        lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=2.5, backend="triton"),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=2.5, scale=d**-0.5),
        (q, k, v),
    )


# dy² + dx² < r²: r = 1 keeps the query itself only (max_d2 = 0), r = 2 drops distance 2 (max_d2 = 3), r = 3 keeps
# (2, 2) at d² = 8 = max_d2 and drops distance 3; √5 keeps d² = 5 = max_d2 (r² rounds above 5). A kernel testing
# `<` instead of `<=` against max_d2, or r² instead of the largest integer below it, fails one of these.
DISC_BOUNDARY_RADII = [1.0, 2.0, 3.0, math.sqrt(5)]


@pytest.mark.parametrize("radius", DISC_BOUNDARY_RADII)
def test_clear_triton_at_integer_and_square_root_radii(radius):
    grid = difattn.TokenGrid(9, 11, text_tokens=2)
    q, k, v = random_qkv(1, 1, grid.num_tokens, 16, device=DEVICE, seed=5)
    compare_with_reference(
        f"clear triton r={radius:g}",
        lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=radius, backend="triton"),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=radius, scale=0.25),
        (q, k, v),
    )


def test_clear_triton_global_kv():
    grid = difattn.TokenGrid(4, 7, text_tokens=2)
    q, k, v = random_qkv(1, 1, grid.num_tokens, 16, device=DEVICE, seed=2)
    kg, vg, _ = random_qkv(1, 1, 3, 16, device=DEVICE, seed=3)
    compare_with_reference(
        "clear triton global",
        lambda q, k, v, kg, vg: difattn.clear_attention(q, k, v, grid, radius=1.5, global_kv=(kg, vg), backend="triton"),
        lambda q, k, v, kg, vg: reference.clear_attention(q, k, v, grid, radius=1.5, global_kv=(kg, vg), scale=0.25),
        (q, k, v, kg, vg),
    )


@pytest.mark.parametrize("pattern", ["neighbors", "criss_cross"])
def test_grat_triton_matches_reference_with_text_mask(pattern):
    grid = difattn.TokenGrid(6, 10, text_tokens=4)
    q, k, v = random_qkv(2, 1, grid.num_tokens, 16, device=DEVICE, seed=4)
    text_mask = torch.tensor([[True, False, True, True], [False, False, True, False]], device=DEVICE)
    kw = dict(group=(3, 4), pattern=pattern, reach=1, text_mask=text_mask)
    compare_with_reference(
        f"grat triton {pattern}",
        lambda q, k, v: difattn.grat_attention(q, k, v, grid, backend="triton", **kw),
        lambda q, k, v: reference.grat_attention(q, k, v, grid, scale=0.25, **kw),
        (q, k, v),
    )
