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


# The v case runs on a grid of several blocks, so that block granularity is visible.
V_GRID = TokenGrid(16, 16, text_tokens=4)  # N = 260
# Per backend, the (rows, columns) of the image tiles its kernels compute together on the query and the key side:
# the torch reference none (exact), the Rust kernels 4 x 4 query tiles (8 x 8 blocks for the engine) and exact key
# segments, Triton's block engine 8 x 16 query and 8 x 8 key blocks.
V_TILES = {"torch": ((1, 1), (1, 1)), "rust": ((8, 8), (1, 1)), "triton": ((8, 16), (8, 8))}


def _tiles(grid: TokenGrid, rows: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Every token in an aligned ``tile`` of the image (or the text) with one of ``rows`` (bool, (N,))."""
    text = grid.is_text()
    image = torch.arange(grid.num_tokens) - grid.image_range.start
    y, x = image // grid.width // tile[0], image % grid.width // tile[1]
    ids = torch.where(text, -1, y * grid.width + x)
    return torch.isin(ids, ids[rows])


# Under the interpreter a Triton forward and backward on this grid takes up to 40 s: Triton runs NaN only (an inf
# in v takes the same path through the kernels: a product with p, then a sum).
V_CASES = [(backend, value) for backend in ["torch"] + BACKENDS for value in ("nan", "inf")
           if backend != "triton" or value == "nan"]


@pytest.mark.parametrize("backend, value", V_CASES, ids=[f"{b}-{v}" for b, v in V_CASES])
@pytest.mark.parametrize("method", difattn.backends.METHODS)
def test_nonfinite_value_reaches_the_queries_that_attend_its_key(backend, method, value):
    """A non-finite v[j, c] makes out[i, c] non-finite for every query i that attends key j, may for the queries of
    a block that visits j's block, and leaves every other output finite. The dense masked reference spread it to
    the whole column (0 · NaN in its product with the masked entries' zeros); it now follows the contract exactly
    (no block granularity). Linear attention and DyDiLA attend every key: the whole column."""
    gen = torch.Generator().manual_seed(4)
    n = V_GRID.num_tokens
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(3))
    j = V_GRID.image_range.start + 5 * V_GRID.width + 6  # an image key, (y, x) = (5, 6)
    q_tile, k_tile = V_TILES[backend]
    key = torch.zeros(n, dtype=torch.bool)
    key[j] = True

    def attending(keys: torch.Tensor) -> torch.Tensor:
        """The queries whose output moves with v[keys, 3] (so attend one of those keys), (N,) bool."""
        if method in ("linear", "dydila"):
            return torch.ones(n, dtype=torch.bool)
        moved = v.clone()
        moved[0, 1, keys, 3] += 1.0
        base = call_method(method, q, k, v, V_GRID, "torch")
        return (call_method(method, q, k, moved, V_GRID, "torch") != base)[0, 1, :, 3]

    attends = attending(key)
    allowed = _tiles(V_GRID, attending(_tiles(V_GRID, key, k_tile)), q_tile)
    poisoned = v.clone()
    poisoned[0, 1, j, 3] = float(value)
    q, k, poisoned = (x.requires_grad_() for x in (q, k, poisoned))
    out = call_method(method, q, k, poisoned, V_GRID, backend)
    bad = ~out.isfinite()
    rows = bad[0, 1, :, 3]
    assert not (attends & ~rows).any(), f"{int((attends & ~rows).sum())} attending queries stay finite"
    assert not (rows & ~allowed).any(), f"{int((rows & ~allowed).sum())} queries beyond the blocks visiting key {j}"
    bad[0, 1, :, 3] = False
    assert not bad.any(), f"{int(bad.sum())} non-finite outputs in other channels or heads"
    # Gradients: dq_i = Σ_j' dS_ij' k_j' with dS_ij' = p_ij' (dout_i·v_j' − dout_i·out_i) is non-finite exactly for
    # the attending queries (up to the same blocks); dv_j' = Σ_i p_ij' dout_i stays finite; the other head is
    # untouched. (dk_j' follows dS over the keys the attending queries see: text queries see every key.) Linear
    # attention's and DyDiLA's dq goes through their feature maps, whose derivative is 0 where a relu is off.
    out.backward(torch.ones_like(out))
    dq_rows = ~q.grad[0, 1].isfinite().all(-1)
    if method not in ("linear", "dydila"):
        assert not (attends & ~dq_rows).any(), f"{int((attends & ~dq_rows).sum())} attending queries with finite dq"
    assert not (dq_rows & ~allowed).any(), f"{int((dq_rows & ~allowed).sum())} dq rows beyond the visiting blocks"
    assert poisoned.grad.isfinite().all() and q.grad[0, 0].isfinite().all() and k.grad[0, 0].isfinite().all()
