"""GRAT's text validity as the authors' released code takes it: an attendable text count per sample, ``(B,)``
integers (sample b's first ``n_b`` text tokens are real), accepted by ``text_mask`` next to the ``(B, T)`` bool
mask, on every backend, against the literal brute force of ``brute_force`` (mask built from the counts by hand)."""

from __future__ import annotations


import pytest
import torch

import difattn
from brute_force import brute_attention, brute_grat_mask
from difattn import TokenGrid
from difattn.testing import compare_with_reference, random_qkv
from backend_cases import DEVICE, HAS_TRITON, parity_backends

BACKENDS = parity_backends(triton_fp16=False)
GRIDS = [TokenGrid(3, 4, text_tokens=4), TokenGrid(4, 3, frames=2, text_tokens=3, text_position="last")]
SCALE = 0.4


def counts_to_mask(counts: list[int], text_tokens: int) -> torch.Tensor:
    """The released convention, written out: text token t of sample b is real when t < n_b."""
    return torch.tensor([[t < n for t in range(text_tokens)] for n in counts])


@pytest.mark.parametrize("grid", GRIDS, ids=["text_first", "video_text_last"])
@pytest.mark.parametrize("backend, dtype", BACKENDS)
def test_text_counts_match_the_twin(backend, dtype, grid):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    counts = [grid.text_tokens, 1, 0]
    q, k, v = random_qkv(3, 2, grid.num_tokens, 8, Dv=6, dtype=dtype, device=DEVICE, seed=4)
    allowed = brute_grat_mask(grid, (1, 2, 2), "neighbors", 0, counts_to_mask(counts, grid.text_tokens))
    options = dict(group=(1, 2, 2), pattern="neighbors", reach=0, scale=SCALE, backend=backend)
    text_counts = torch.tensor(counts, device=DEVICE)
    compare_with_reference(
        "grat text counts",
        lambda q, k, v: difattn.grat_attention(q, k, v, grid, text_mask=text_counts, **options),
        lambda q, k, v: brute_attention(q.cpu(), k.cpu(), v.cpu(), allowed, SCALE).to(q.device),
        (q, k, v),
    )


def test_counts_and_mask_are_the_same_call():
    """Counts are the mask they stand for, exactly (and a count differs from no mask: the option is used)."""
    grid = GRIDS[0]
    q, k, v = random_qkv(3, 2, grid.num_tokens, 8, dtype=torch.float64, seed=5)
    counts = [4, 1, 0]
    by_count = difattn.grat_attention(q, k, v, grid, reach=0, text_mask=torch.tensor(counts), backend="torch")
    by_mask = difattn.grat_attention(q, k, v, grid, reach=0, text_mask=counts_to_mask(counts, 4), backend="torch")
    assert torch.equal(by_count, by_mask)
    assert not torch.allclose(by_count, difattn.grat_attention(q, k, v, grid, reach=0, backend="torch"))


def test_text_counts_are_checked():
    grid = GRIDS[0]
    q, k, v = random_qkv(2, 1, grid.num_tokens, 8)
    with pytest.raises(ValueError, match="text_mask"):
        difattn.grat_attention(q, k, v, grid, text_mask=torch.tensor([1, 5]))  # more than T = 4
    with pytest.raises(ValueError, match="text_mask"):
        difattn.grat_attention(q, k, v, grid, text_mask=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="text_mask"):
        difattn.grat_attention(q, k, v, grid, text_mask=torch.tensor([1, 2, 3]))  # B = 2
    with pytest.raises(TypeError, match="text_mask"):
        difattn.grat_attention(q, k, v, grid, text_mask=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="text_mask"):
        difattn.grat_attention(q, k, v, grid, text_mask=[1, 2])
