"""GRAT on the Rust block engine against the torch reference, forward and every gradient."""

import difattn
import torch
from difattn import reference
from difattn.testing import compare_with_reference, random_qkv
from difattn.testing.strategies import head_dims, token_grids
from hypothesis import example, given
from hypothesis import strategies as st


@given(grid=token_grids(max_side=20, max_text=300, max_tokens=500),
       pattern=st.sampled_from(["neighbors", "criss_cross"]),
       group=st.tuples(st.integers(1, 6), st.integers(1, 6)), reach=st.integers(0, 2), d=head_dims(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99), masked=st.booleans())
# FLUX's 512 text tokens (several blocks) with a padding mask; FLUX's 16x16 groups on sides they do not divide
# (border groups smaller); reach 0 (a group sees only itself) and criss-cross bands through border groups.
@example(grid=difattn.TokenGrid(12, 16, text_tokens=512), pattern="neighbors", group=(4, 6), reach=1, d=128,
         dtype=torch.float32, seed=0, masked=True)
@example(grid=difattn.TokenGrid(20, 37, text_tokens=5, text_position="last"), pattern="criss_cross", group=(16, 16),
         reach=1, d=64, dtype=torch.float16, seed=1, masked=False)
@example(grid=difattn.TokenGrid(18, 21), pattern="neighbors", group=(16, 16), reach=0, d=72, dtype=torch.float32,
         seed=2, masked=False)
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
