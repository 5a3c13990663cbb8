"""PISA's conventions from the authors' released code, on every backend, against the independent twins of
``pisa_brute`` (written from the formulas, not from the code under test), on shapes where the conventions differ:
ragged N (a short last block), grids with border tiles and text runs that are not a multiple of the block.

- the hybrid order's first-order term weights each unselected block by its token count,
  ``s·(Σ_U n_j e^{c_j−m})·q·(Σ_j H_j)/N`` (the released kernel), forward and gradients;
- the routing biases ``"centered"`` (the paper), ``"uncentered"`` (the released kernels), ``"key_variance"`` (the
  trainable zeroth-order variant) select exactly the twin's blocks;
- a selection passed as ``blocks=`` is honoured and validated by the public function on every backend;
- cross-attention (k, v longer or shorter than q, as the authors' zeroth-order variant allows): query blocks over q,
  key blocks over k, on the torch backend; the kernels' backends refuse it by the backend table with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch

import difattn
from difattn.testing import compare_with_reference, random_qkv
from backend_cases import DEVICE, HAS_TRITON, parity_backends
from pisa_brute import brute_layout, brute_pisa_batched, brute_route

BACKENDS = parity_backends(triton_fp16=True)
# Ragged shapes: a short last block; border tiles of 2x1, 1x2 and 1x1 plus a text run of 4 + 2; a video whose
# tiles of 2x4 are cut at the right border and the text run of 3 is one short block.
SHAPES = {
    "ragged_n": (None, 27, 4),
    "border_tiles_text_last": (difattn.TokenGrid(5, 7, text_tokens=6, text_position="last"), None, 4),
    "video_text_first": (difattn.TokenGrid(3, 5, frames=2, text_tokens=3), None, 8),
}


def _skip_without_triton(backend: str) -> None:
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")


def _case(name: str, dtype: torch.dtype, seed: int, dim: int = 8):
    grid, num_tokens, block_size = SHAPES[name]
    num_tokens = grid.num_tokens if grid is not None else num_tokens
    q, k, v = random_qkv(1, 2, num_tokens, dim, Dv=dim - 2, dtype=dtype, device=DEVICE, seed=seed,
                         token_major=True)
    return grid, block_size, brute_layout(grid, num_tokens, block_size), (q, k, v)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("order", ["zeroth", "hybrid"])
def test_first_order_term_weights_blocks_by_token_count(backend, dtype, shape, order):
    """Forward and gradients of every backend against the twin of the released weighting (the shapes' ragged blocks
    make it differ from ``s·(Σ_U e^{c_j−m})·q·(1/M) Σ_j H_j``: the test fails on the old rule)."""
    _skip_without_triton(backend)
    grid, block_size, layout, (q, k, v) = _case(shape, dtype, seed=3)
    density = 0.3
    num_selected = max(1, math.floor(density * len(layout)))
    gen = torch.Generator().manual_seed(5)
    blocks = torch.stack([torch.randperm(len(layout), generator=gen)[:num_selected] for _ in range(2 * len(layout))])
    blocks = blocks.reshape(1, 2, len(layout), num_selected).to(DEVICE)
    compare_with_reference(
        f"pisa {backend} {order} {shape}",
        lambda q, k, v: difattn.pisa_attention(q, k, v, density=density, block_size=block_size, order=order,
                                               grid=grid, blocks=blocks, scale=0.4, backend=backend),
        lambda q, k, v: brute_pisa_batched(q, k, v, layout, blocks, 0.4, order),
        (q, k, v),
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "rust", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("bias", [True, "centered", "uncentered", "key_variance"])
@pytest.mark.parametrize("sink", [None, "last"])
def test_routing_biases_select_the_twins_blocks(backend, bias, shape, sink):
    _skip_without_triton(backend)
    grid, block_size, layout, (q, k, v) = _case(shape, torch.float32, seed=11)
    density = 0.4
    _, blocks = difattn.pisa_attention(q, k, v, density=density, block_size=block_size, routing_bias=bias, sink=sink,
                                       grid=grid, return_blocks=True, scale=0.35, backend=backend)
    num_selected = max(1, math.floor(density * len(layout)))
    q64, k64, v64 = (x.double().cpu() for x in (q, k, v))
    for h in range(2):
        expected = brute_route(q64[0, h], k64[0, h], v64[0, h], layout, 0.35, num_selected, bias, sink)
        assert blocks[0, h].tolist() == expected, (backend, bias, h)


def test_routing_biases_differ_on_these_shapes():
    """The three biases and no bias are four different rules here (else the test above could not tell them apart)."""
    grid, block_size, layout, (q, k, v) = _case("border_tiles_text_last", torch.float64, seed=11)
    selections = {
        str(bias): difattn.pisa_attention(q, k, v, density=0.4, block_size=block_size, routing_bias=bias, grid=grid,
                                          return_blocks=True, scale=0.35)[1]
        for bias in (False, "centered", "uncentered", "key_variance")
    }
    names = list(selections)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(selections[a], selections[b]), (a, b)


@pytest.mark.parametrize("backend", ["torch", "rust", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_given_blocks_are_honoured(backend):
    """A selection made by the caller replaces the routing on every backend: the output is the twin's for it."""
    _skip_without_triton(backend)
    grid, block_size, layout, (q, k, v) = _case("border_tiles_text_last", torch.float32, seed=2)
    num_selected = max(1, math.floor(0.3 * len(layout)))
    # Worst-scored blocks: nothing the routing would pick.
    _, routed = difattn.pisa_attention(q, k, v, density=1.0, block_size=block_size, grid=grid, return_blocks=True)
    blocks = routed.flip(-1)[..., :num_selected].contiguous()
    out, returned = difattn.pisa_attention(q, k, v, density=0.3, block_size=block_size, grid=grid, blocks=blocks,
                                           return_blocks=True, backend=backend)
    assert torch.equal(returned, blocks)
    expected = brute_pisa_batched(*(x.double() for x in (q, k, v)), layout, blocks, 8**-0.5, "hybrid")
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "rust", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bad_blocks_are_rejected_by_the_public_function(backend):
    _skip_without_triton(backend)
    q, k, v = random_qkv(1, 2, 18, 4, device=DEVICE, seed=9)  # block_size 4: M = 5 (the last of 2), k = 2
    good = torch.zeros(1, 2, 5, 2, dtype=torch.int64, device=DEVICE)
    good[..., 1] = 4
    kw = dict(density=0.4, block_size=4, backend=backend)
    difattn.pisa_attention(q, k, v, blocks=good, **kw)
    for bad, message in ((good[..., :1], "shape"), (good + 1, r"\[0, 5\)"), (good - 4, r"\[0, 5\)"),
                         (torch.zeros_like(good), "repeat"), (good[:, :1], "shape")):
        with pytest.raises(ValueError, match="blocks"):
            difattn.pisa_attention(q, k, v, blocks=bad, **kw)
    with pytest.raises(TypeError, match="blocks"):
        difattn.pisa_attention(q, k, v, blocks=good.int(), **kw)
    with pytest.raises(ValueError, match="routing_bias and sink"):
        difattn.pisa_attention(q, k, v, blocks=good, routing_bias="uncentered", **kw)
    with pytest.raises(ValueError, match="routing_bias and sink"):
        difattn.pisa_attention(q, k, v, blocks=good, sink="first", **kw)


def test_routing_bias_values_are_checked():
    q, k, v = random_qkv(1, 1, 16, 4, seed=1)
    with pytest.raises(ValueError, match="routing_bias"):
        difattn.pisa_attention(q, k, v, block_size=4, routing_bias="centred")
    with pytest.raises(TypeError, match="routing_bias"):
        difattn.pisa_attention(q, k, v, block_size=4, routing_bias=1)


CROSS = [(27, 13), (10, 33)]  # (N, Nk) with short last blocks on both sides (block size 4)


def _cross_case(num_queries: int, num_keys: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, num_queries, 8, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(1, 2, num_keys, 8, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(1, 2, num_keys, 6, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, brute_layout(None, num_queries, 4), brute_layout(None, num_keys, 4)


@pytest.mark.parametrize("lengths", CROSS)
@pytest.mark.parametrize("order", ["zeroth", "hybrid", "first"])
def test_cross_attention_matches_the_twin(lengths, order):
    """Forward and gradients with a given selection, and the routing of every bias, against the twin."""
    q, k, v, layout, key_layout = _cross_case(*lengths, torch.float32, seed=7)
    density = 0.5
    num_selected = max(1, math.floor(density * len(key_layout)))
    gen = torch.Generator().manual_seed(1)
    blocks = torch.stack([torch.randperm(len(key_layout), generator=gen)[:num_selected]
                          for _ in range(2 * len(layout))]).reshape(1, 2, len(layout), num_selected)
    compare_with_reference(
        f"pisa cross {order} {lengths}",
        lambda q, k, v: difattn.pisa_attention(q, k, v, density=density, block_size=4, order=order, blocks=blocks,
                                               scale=0.4),
        lambda q, k, v: brute_pisa_batched(q, k, v, layout, blocks, 0.4, order, key_layout),
        (q, k, v),
    )
    q64, k64, v64 = (x.double() for x in (q, k, v))
    for bias in (False, "centered", "uncentered", "key_variance"):
        _, routed = difattn.pisa_attention(q, k, v, density=density, block_size=4, order=order, routing_bias=bias,
                                           sink="last", return_blocks=True, scale=0.4)
        for h in range(2):
            expected = brute_route(q64[0, h], k64[0, h], v64[0, h], layout, 0.4, num_selected, bias, "last",
                                   key_layout)
            assert routed[0, h].tolist() == expected, (bias, h)


@pytest.mark.parametrize("backend", ["rust", "triton"])
def test_cross_attention_is_refused_by_the_kernels_backends(backend):
    q, k, v, _, _ = _cross_case(27, 13, torch.float32, seed=2)
    ok, reason = difattn.backends.BACKENDS[backend].can_run("pisa", torch.device("cpu"), torch.float32,
                                                            {"order": "hybrid", "cross": True})
    assert not ok
    if backend == "rust" or HAS_TRITON:  # else triton is refused for the device first
        assert "cross-attention" in reason
    if backend == "rust":
        with pytest.raises(RuntimeError, match="cross-attention"):
            difattn.pisa_attention(q, k, v, block_size=4, backend="rust")
        # auto falls back to the torch reference, which runs it
        torch.testing.assert_close(difattn.pisa_attention(q, k, v, block_size=4),
                                   difattn.pisa_attention(q, k, v, block_size=4, backend="torch"))


def test_cross_attention_arguments_are_checked():
    q, k, v, _, _ = _cross_case(27, 13, torch.float32, seed=3)
    with pytest.raises(ValueError, match="grid"):
        difattn.pisa_attention(q, k, v, block_size=4, grid=difattn.TokenGrid(3, 9))
    with pytest.raises(ValueError, match="v must have k's sequence length"):
        difattn.pisa_attention(q, k, v[:, :, :12], block_size=4)
    wrong = torch.zeros(1, 2, 7, 1, dtype=torch.int64)  # M = 7 query blocks, k = 1 of Mk = 4: ids below 4
    wrong[..., 0] = 4
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        difattn.pisa_attention(q, k, v, density=0.3, block_size=4, blocks=wrong)
