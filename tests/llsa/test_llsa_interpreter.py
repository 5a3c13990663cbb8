"""Tier 1: the Triton LLSA kernels under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16, tiny shapes): forward and
every gradient against the torch reference given the same selection, at 1-3 levels, ragged N, block sizes that are
not powers of two, head dims that are not powers of two, and through the public function with a grid and text."""

import os

import pytest
import torch

import difattn
from difattn import reference
from difattn.ops.llsa import method as llsa_method
from difattn.ops.llsa import plan as llsa_plan
from difattn.testing import compare_with_reference, random_qkv

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("tier 1 needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, N, block_size, topks, D, Dv, dtype): ragged N everywhere; L = 1, 2, 3 (gradients reach k and v through
# every level's pooled tokens); a block size of 3.
CASES = [
    (1, 1, 30, 4, (2,), 24, None, torch.float32),
    (1, 2, 37, 4, (2, 2), 16, 8, torch.float16),
    (1, 1, 37, 4, (2, 2, 1), 16, None, torch.float32),
    (1, 1, 29, 3, (2, 2), 20, None, torch.float16),
]


def selection(q, k, block_size, topks):
    _, indices = reference.llsa_attention(q, k, k, block_size=block_size, topk=topks, levels=len(topks),
                                          return_indices=True)
    return indices


@pytest.mark.parametrize("B, H, N, block_size, topks, d, dv, dtype", CASES)
def test_triton_matches_reference_given_indices(B, H, N, block_size, topks, d, dv, dtype):
    q, k, v = random_qkv(B, H, N, d, Dv=dv, dtype=dtype, device=DEVICE, seed=N, token_major=True)
    indices = selection(q, k, block_size, topks)
    layout = llsa_plan.Layout(N, block_size, topks)
    compare_with_reference(
        "llsa triton",
        lambda q, k, v: llsa_method.attend(q, k, v, indices, layout, scale=d**-0.5, backend="triton"),
        lambda q, k, v: reference.llsa_attention(q, k, v, block_size=block_size, topk=topks, levels=len(topks),
                                                 scale=d**-0.5, indices=indices),
        (q, k, v),
    )


def test_triton_public_function_with_grid_and_text():
    grid = difattn.TokenGrid(5, 6, text_tokens=2, text_position="last")
    q, k, v = random_qkv(1, 1, grid.num_tokens, 16, device=DEVICE, seed=7)
    _, indices = difattn.llsa_attention(q, k, v, block_size=4, topk=(2, 1), levels=2, grid=grid,
                                        return_indices=True, backend="triton")
    compare_with_reference(
        "llsa triton grid",
        lambda q, k, v: difattn.llsa_attention(q, k, v, block_size=4, topk=(2, 1), levels=2, grid=grid,
                                               backend="triton"),
        lambda q, k, v: reference.llsa_attention(q, k, v, block_size=4, topk=(2, 1), levels=2, grid=grid,
                                                 scale=0.25, indices=indices),
        (q, k, v),
    )
