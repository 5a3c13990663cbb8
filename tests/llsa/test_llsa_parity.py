"""LLSA's conventions from the authors' released code, on every backend, against the independent twins of
``llsa_brute`` (written from the formulas, not from the code under test), on ragged N where they differ:

- ``coarse_pooling="children"`` (the default: a level-l token is the plain mean of its level-(l−1) children, the
  authors' variable-length rule) and ``"tokens"`` (the count-weighted mean of the fine tokens), forward, gradients
  and selection;
- ``token_weight`` (the authors' kernels' per-level weight of the pooled tokens) instead of the counts;
- a selection passed as ``indices=`` is honoured and validated by the public function on every backend.
"""

from __future__ import annotations


import pytest
import torch

import difattn
from difattn.testing import compare_with_reference, random_qkv
from backend_cases import DEVICE, HAS_TRITON, parity_backends
from llsa_brute import brute_llsa_batched, brute_select, brute_zorder

BACKENDS = parity_backends(triton_fp16=True)
# N = 37, blocks of 4: level 1 has 10 tokens (the last covers 1 fine token), level 2 has 3 (the last has 2
# children, 5 fine tokens): the rules differ there. The grid: 35 image tokens in Z-order plus 4 text tokens.
SHAPES = {
    "ragged_n": (None, 37, 4, (2, 2)),
    "three_levels": (None, 37, 3, (2, 2, 1)),
    "grid_text_last": (difattn.TokenGrid(5, 7, text_tokens=4, text_position="last"), None, 4, (2, 2)),
}


def _skip_without_triton(backend: str) -> None:
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")


def _case(name: str, dtype: torch.dtype, seed: int):
    grid, num_tokens, block_size, topks = SHAPES[name]
    num_tokens = grid.num_tokens if grid is not None else num_tokens
    q, k, v = random_qkv(1, 2, num_tokens, 8, Dv=6, dtype=dtype, device=DEVICE, seed=seed, token_major=True)
    return grid, block_size, topks, (q, k, v)


def _options(grid, block_size, topks, **extra):
    return dict(block_size=block_size, topk=topks, levels=len(topks), grid=grid, scale=0.4, **extra)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("pooling", ["children", "tokens"])
def test_pooling_rules_match_the_twin(backend, dtype, shape, pooling):
    """Forward and gradients (through the pooled tokens of every level: the rule's mean-pool backward)."""
    _skip_without_triton(backend)
    grid, block_size, topks, (q, k, v) = _case(shape, dtype, seed=4)
    options = _options(grid, block_size, topks, coarse_pooling=pooling)
    _, indices = difattn.llsa_attention(q, k, v, return_indices=True, backend=backend, **options)
    compare_with_reference(
        f"llsa {backend} {pooling} {shape}",
        lambda q, k, v: difattn.llsa_attention(q, k, v, indices=indices, backend=backend, **options),
        lambda q, k, v: brute_llsa_batched(q, k, v, block_size, indices, 0.4, grid, pooling),
        (q, k, v),
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "rust", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("pooling", ["children", "tokens"])
def test_selection_pools_queries_and_keys_by_the_rule(backend, shape, pooling):
    _skip_without_triton(backend)
    grid, block_size, topks, (q, k, v) = _case(shape, torch.float32, seed=12)
    _, indices = difattn.llsa_attention(q, k, v, return_indices=True, backend=backend,
                                        **_options(grid, block_size, topks, coarse_pooling=pooling))
    order = list(range(q.shape[2])) if grid is None else brute_zorder(grid)
    q64, k64 = (x.double().cpu()[:, :, order] for x in (q, k))
    for h in range(2):
        expected = brute_select(q64[0, h], k64[0, h], block_size, topks, pooling)
        assert [ids[0, h].tolist() for ids in indices] == expected, (backend, pooling, h)


def test_pooling_rules_differ_and_children_is_the_default():
    grid, block_size, topks, (q, k, v) = _case("ragged_n", torch.float64, seed=4)
    _, indices = difattn.llsa_attention(q, k, v, return_indices=True, **_options(grid, block_size, topks))
    outputs = {pooling: difattn.llsa_attention(q, k, v, indices=indices,
                                               **_options(grid, block_size, topks, coarse_pooling=pooling))
               for pooling in ("children", "tokens")}
    default = difattn.llsa_attention(q, k, v, indices=indices, **_options(grid, block_size, topks))
    assert torch.equal(default, outputs["children"])
    assert difattn.testing.rel_error(outputs["children"], outputs["tokens"]) > 1e-3


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("token_weight", [1.0, (4.0, 16.0), (0.5, 3.0)])
def test_token_weight_replaces_the_counts(backend, dtype, token_weight):
    """``token_weight=(b, b**2)`` is what the authors' kernels are given; it differs from the counts only at the last
    (short) token of each level, which this N has."""
    _skip_without_triton(backend)
    grid, block_size, topks, (q, k, v) = _case("ragged_n", dtype, seed=7)
    options = _options(grid, block_size, topks, token_weight=token_weight)
    _, indices = difattn.llsa_attention(q, k, v, return_indices=True, backend=backend, **options)
    weights = token_weight if isinstance(token_weight, tuple) else (token_weight,) * len(topks)
    compare_with_reference(
        f"llsa {backend} token_weight={token_weight}",
        lambda q, k, v: difattn.llsa_attention(q, k, v, indices=indices, backend=backend, **options),
        lambda q, k, v: brute_llsa_batched(q, k, v, block_size, indices, 0.4, grid, "children", weights),
        (q, k, v),
    )


def test_bad_pooling_and_token_weight_are_rejected():
    q, k, v = random_qkv(1, 1, 37, 4, seed=1)
    with pytest.raises(ValueError, match="coarse_pooling"):
        difattn.llsa_attention(q, k, v, block_size=4, topk=2, levels=2, coarse_pooling="mean")
    with pytest.raises(TypeError, match="coarse_pooling"):
        difattn.llsa_attention(q, k, v, block_size=4, topk=2, levels=2, coarse_pooling=None)
    for bad in (0.0, -1.0, (4.0,), (4.0, float("nan"))):
        with pytest.raises(ValueError, match="token_weight"):
            difattn.llsa_attention(q, k, v, block_size=4, topk=2, levels=2, token_weight=bad)


@pytest.mark.parametrize("backend", ["torch", "rust", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_given_indices_are_honoured_and_validated(backend):
    _skip_without_triton(backend)
    grid, block_size, topks, (q, k, v) = _case("grid_text_last", torch.float32, seed=3)
    options = _options(grid, block_size, topks)
    _, routed = difattn.llsa_attention(q, k, v, return_indices=True, **options)
    # A fixed pattern of distinct ids per row (level-l query j takes (j + 1 + i) mod n_l), not the routing's.
    given = []
    for ids in routed:
        n, kk = ids.shape[2], ids.shape[3]
        rows = (torch.arange(n)[:, None] + 1 + torch.arange(kk)[None, :]) % n
        given.append(rows.expand(ids.shape).contiguous().to(DEVICE))
    assert not all(torch.equal(a, b) for a, b in zip(routed, given))
    out, returned = difattn.llsa_attention(q, k, v, indices=given, return_indices=True, backend=backend, **options)
    assert all(torch.equal(a, b) for a, b in zip(returned, given))
    expected = brute_llsa_batched(*(x.double() for x in (q, k, v)), block_size, given, 0.4, grid)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    fine, coarse = given
    repeated = fine.clone()
    repeated[..., 1] = repeated[..., 0]
    for bad, error in (([fine[..., :1], coarse], ValueError), ([fine, coarse + 3], ValueError),
                       ([repeated, coarse], ValueError), ([fine.int(), coarse], TypeError), ([fine], TypeError)):
        with pytest.raises(error, match="indices"):
            difattn.llsa_attention(q, k, v, indices=bad, backend=backend, **options)
