"""GRAT on the Rust block engine against the torch reference, forward and every gradient."""

import difattn
import torch
from difattn import reference
from difattn.testing import compare_with_reference, random_qkv
from difattn.testing.strategies import head_dims, token_grids
from hypothesis import given
from hypothesis import strategies as st


@given(grid=token_grids(max_side=20, max_tokens=400), pattern=st.sampled_from(["neighbors", "criss_cross"]),
       group=st.tuples(st.integers(1, 6), st.integers(1, 6)), reach=st.integers(0, 2), d=head_dims(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99), masked=st.booleans())
def test_grat_rust_matches_reference(grid, pattern, group, reach, d, dtype, seed, masked):
    q, k, v = random_qkv(2, 1, grid.num_tokens, d, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    text_mask = torch.rand(2, grid.text_tokens, generator=gen) > 0.4 if masked else None
    kw = dict(group=group, pattern=pattern, reach=reach, text_mask=text_mask)
    compare_with_reference(
        "grat",
        lambda q, k, v: difattn.grat_attention(q, k, v, grid, backend="rust", **kw),
        lambda q, k, v: reference.grat_attention(q, k, v, grid, scale=d**-0.5, **kw),
        (q, k, v),
    )
