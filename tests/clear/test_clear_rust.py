"""CLEAR's CPU disc kernels (backend="rust") against the torch reference, forward and every gradient."""

import math

import difattn
import pytest
import torch
from difattn import reference
from difattn.testing import compare_with_reference, random_qkv
from difattn.testing.strategies import disc_radii, head_dims, token_grids
from hypothesis import example, given
from hypothesis import strategies as st


@given(grid=token_grids(max_side=20, max_text=300, max_tokens=500), radius=disc_radii(7.0), d=head_dims(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 99))
# FLUX's 512 text tokens (32 text tiles of the kernels) at the spec's r = 8, text first and last; an edge query's
# quarter disc on a grid narrower than the disc.
@example(grid=difattn.TokenGrid(12, 16, text_tokens=512), radius=8.0, d=128, dtype=torch.bfloat16, seed=0)
@example(grid=difattn.TokenGrid(9, 13, text_tokens=512, text_position="last"), radius=8.0, d=64,
         dtype=torch.float32, seed=1)
@example(grid=difattn.TokenGrid(3, 30, text_tokens=7), radius=5.0, d=72, dtype=torch.float16, seed=2)
# bf16 in consecutive rows (odd seed: head-major), what the bf16 dot products read (where the CPU has them): odd
# grid widths start disc rows at odd keys.
@example(grid=difattn.TokenGrid(13, 11, text_tokens=5), radius=4.0, d=64, dtype=torch.bfloat16, seed=1)
def test_clear_rust_matches_reference(grid, radius, d, dtype, seed):
    q, k, v = random_qkv(1, 2, grid.num_tokens, d, dtype=dtype, seed=seed, token_major=seed % 2 == 0)
    scale = d**-0.5
    compare_with_reference(
        "clear",
        lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=radius, backend="rust"),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=radius, scale=scale),
        (q, k, v),
    )


@given(grid=token_grids(max_side=12, max_text=100, max_tokens=300), radius=disc_radii(5.0),
       rt=st.integers(1, 3).map(float) | st.floats(0.5, 3.0), globals_=st.integers(0, 3), d=head_dims(),
       seed=st.integers(0, 99))
# rt = 1: each frame on its own (|dt| < 1); rt = 2: neighbouring frames; global tokens with long text.
@example(grid=difattn.TokenGrid(5, 6, frames=3, text_tokens=4), radius=3.0, rt=1.0, globals_=2, d=64, seed=0)
@example(grid=difattn.TokenGrid(4, 7, frames=3, text_tokens=150, text_position="last"), radius=2.0, rt=2.0,
         globals_=3, d=72, seed=1)
def test_clear_rust_videos_and_global_tokens_match_reference(grid, radius, rt, globals_, d, seed):
    """Frames within ``temporal_radius`` and global tokens (every image query sees them, text queries do not)."""
    q, k, v = random_qkv(1, 2, grid.num_tokens, d, seed=seed)
    kg, vg, _ = random_qkv(1, 2, globals_, d, seed=seed + 1)
    kw = dict(radius=radius, temporal_radius=rt)
    if globals_:
        compare_with_reference(
            "clear video+global",
            lambda q, k, v, kg, vg: difattn.clear_attention(q, k, v, grid, global_kv=(kg, vg), backend="rust", **kw),
            lambda q, k, v, kg, vg: reference.clear_attention(q, k, v, grid, global_kv=(kg, vg), scale=d**-0.5, **kw),
            (q, k, v, kg, vg),
        )
    else:
        compare_with_reference(
            "clear video",
            lambda q, k, v: difattn.clear_attention(q, k, v, grid, backend="rust", **kw),
            lambda q, k, v: reference.clear_attention(q, k, v, grid, scale=d**-0.5, **kw),
            (q, k, v),
        )


def test_clear_global_kv_gradients():
    grid = difattn.TokenGrid(9, 10, text_tokens=4, text_position="last")
    q, k, v = random_qkv(2, 2, grid.num_tokens, 72, seed=3)
    kg, vg, _ = random_qkv(2, 2, 5, 72, seed=4)
    compare_with_reference(
        "clear+global",
        lambda q, k, v, kg, vg: difattn.clear_attention(q, k, v, grid, radius=2.5, global_kv=(kg, vg), backend="rust"),
        lambda q, k, v, kg, vg: reference.clear_attention(q, k, v, grid, radius=2.5, global_kv=(kg, vg), scale=72**-0.5),
        (q, k, v, kg, vg),
    )


# Integer radii keep the offsets strictly inside (r = 1: the query alone; r = 3: d² <= 8, so (2, 2) in and (3, 0)
# out), √k radii keep d² = k (r² rounds above k), and r slightly above an integer k reaches (k, 0) only: the rows
# where dy² is the whole budget. A threshold off by one anywhere (max_d2, a disc row's half width, `<` for `<=`)
# fails one of these.
DISC_BOUNDARY_RADII = [1.0, 2.0, 3.0, 8.0, math.sqrt(2), math.sqrt(5), math.sqrt(8), 2.1, 3.05]


@pytest.mark.parametrize("radius", DISC_BOUNDARY_RADII)
def test_clear_rust_at_integer_and_square_root_radii(radius):
    grid = difattn.TokenGrid(19, 22, frames=2, text_tokens=5, text_position="last")
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, seed=int(radius * 100))
    compare_with_reference(
        f"clear rust r={radius:g}",
        lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=radius, temporal_radius=1.5, backend="rust"),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=radius, temporal_radius=1.5, scale=0.25),
        (q, k, v),
    )
