"""Tier 1: the Triton PISA kernels under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16, tiny shapes), forward and
every gradient against the torch reference given the same selected blocks, and the late centroid that raises
the running max in a later chunk."""

import os

import pytest
import torch

import difattn
from difattn import reference
from difattn._options import pisa_routing_bias
from difattn.ops.pisa.method import pisa_on_kernels
from difattn.testing import compare_with_reference, random_qkv
from pisa_cases import late_centroid_case

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("tier 1 needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    (None, 45, torch.float32, 16, "hybrid", 8),
    (difattn.TokenGrid(4, 7, text_tokens=3, text_position="last"), 31, torch.float16, 24, "zeroth", 4),
    (difattn.TokenGrid(3, 4, frames=2, text_tokens=5), 29, torch.float32, 16, "hybrid", 8),
]


@pytest.fixture
def small_chunks(monkeypatch):
    """Centroid chunks of 16 so that tiny shapes still span several chunks."""
    from difattn.triton_kernels import pisa as tk

    monkeypatch.setattr(tk, "CENTROID_CHUNK", 16)


def triton_pisa(q, k, v, **options):
    options["routing_bias"] = pisa_routing_bias(options["routing_bias"])
    return pisa_on_kernels(q, k, v, backend="triton", **options)


@pytest.mark.parametrize("grid, num_tokens, dtype, d, order, block_size", CASES)
def test_pisa_triton_matches_reference(grid, num_tokens, dtype, d, order, block_size):
    num_tokens = grid.num_tokens if grid is not None else num_tokens
    q, k, v = random_qkv(1, 1, num_tokens, d, Dv=d + 8, dtype=dtype, device=DEVICE, seed=d, token_major=True)
    kw = dict(density=0.3, block_size=block_size, order=order, routing_bias=False, sink="first", grid=grid, scale=0.3)
    _, blocks = reference.pisa_attention(q, k, v, return_blocks=True, **kw)  # routing is shared torch code
    compare_with_reference(
        f"pisa triton {order}",
        lambda q, k, v: triton_pisa(q, k, v, return_blocks=False, blocks=blocks, **kw),
        lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, **kw),
        (q, k, v),
    )


def test_pisa_triton_late_centroid_raising_the_max(small_chunks):
    num_blocks = 20  # two chunks of 16 centroids: the max rises in the second
    (q, k, v), blocks = late_centroid_case(num_blocks)
    q, k, v, blocks = (x.to(DEVICE) for x in (q, k, v, blocks))
    kw = dict(density=1 / num_blocks, block_size=2, order="hybrid", routing_bias=False, sink=None, grid=None,
              return_blocks=False, scale=1.0)
    compare_with_reference(
        "late centroid triton",
        lambda q, k, v: triton_pisa(q, k, v, blocks=blocks, **kw),
        lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, **kw),
        (q, k, v),
    )
