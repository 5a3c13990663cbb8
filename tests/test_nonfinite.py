"""NaN and ±inf in q or k give the NaN/inf pattern of the torch reference on every method and backend.

Every max of an online softmax once skipped NaN (GRAT turned a NaN query into an all-zero row, the reference a
NaN row), and DyDiLA's power map dropped NaN through its relu and clamp (one NaN in k: no NaN output against the
reference's whole rows)."""

import os

import pytest
import torch

import difattn
from difattn import TokenGrid
from backend_cases import call_method

GRID = TokenGrid(6, 6, text_tokens=4)  # N = 40
N = GRID.num_tokens
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
BACKENDS = ["rust"] + (["triton"] if INTERPRETING else [])


def _run(method, q, k, v, backend):
    return call_method(method, q, k, v, GRID, backend)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("method", difattn.backends.METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_give_the_reference_pattern(backend, method, where, value):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, N, 8, generator=gen) for _ in range(3))
    # One entry of an image token, and a whole row of another (all its logits non-finite).
    x = q if where == "q" else k
    x[0, 0, 9, 3] = value
    x[0, 1, 22] = value
    want = _run(method, q, k, v, "torch")
    got = _run(method, q, k, v, backend)
    assert torch.equal(got.isnan(), want.isnan()), f"NaN: {got.isnan().sum()} outputs, reference {want.isnan().sum()}"
    assert torch.equal(got.isinf(), want.isinf()), f"inf: {got.isinf().sum()} outputs, reference {want.isinf().sum()}"
