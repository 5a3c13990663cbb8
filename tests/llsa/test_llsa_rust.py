"""LLSA on the Rust CPU kernels: forward and every gradient against the torch reference given the same selection
(hypothesis over ragged N, batch, heads, block size, top-K, 1-3 levels, head dims incl. 72, fp32/fp16/bf16), the
gradient through the pooled tokens of every level, the selection against the reference's (exactly, ties included),
grids with text, the key-side plans, and the ops' registrations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import difattn
from difattn import reference
from difattn._options import llsa_config, llsa_level_sizes
from difattn.ops._base.orders import zorder
from difattn.ops.llsa import method as llsa_method
from difattn.ops.llsa import op as llsa_op
from difattn.ops.llsa import plan as llsa_plan
from difattn.reference._dense import masked_attention
from difattn.reference.llsa import _candidate_mask, _counts, _pyramid
from difattn.ops._base.registry import launcher
from difattn.reference.ordering import zorder_permutation
from difattn.testing import compare_with_reference, random_qkv, torch_threads
from difattn.testing.strategies import token_grids


@st.composite
def configs(draw, max_tokens: int = 160):
    """``(N, block_size, topks)`` accepted by llsa_config, ragged N and 1-3 levels."""
    num_tokens = draw(st.integers(2, max_tokens))
    block_size = draw(st.integers(2, 5))
    levels = draw(st.integers(1, 3))
    topks = tuple(draw(st.integers(1, 4)) for _ in range(levels))
    try:
        llsa_config(num_tokens, block_size, topks, levels)
    except ValueError:
        assume(False)
    return num_tokens, block_size, topks


def reference_indices(q, k, block_size, topks, grid=None):
    _, indices = reference.llsa_attention(q, k, k, block_size=block_size, topk=topks, levels=len(topks), grid=grid,
                                          return_indices=True)
    return indices


def rust_attend(indices, block_size, topks, scale, pooling="children"):
    def run(q, k, v):
        layout = llsa_plan.Layout(q.shape[2], block_size, topks, pooling == "children")
        return llsa_method.attend(q, k, v, indices, layout, scale=scale, backend="rust")
    return run


def reference_attend(indices, block_size, topks, scale, pooling="children"):
    def run(q, k, v):
        return reference.llsa_attention(q, k, v, block_size=block_size, topk=topks, levels=len(topks), scale=scale,
                                        indices=indices, coarse_pooling=pooling)
    return run


@given(config=configs(), batch=st.integers(1, 2), heads=st.integers(1, 2), d=st.sampled_from([8, 16, 72]),
       dv=st.sampled_from([None, 24]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 999))
# The paper's block 16 and top-8: one level at 300 tokens (19 blocks, the last ragged), two at 2,100 tokens.
@example(config=(300, 16, (8,)), batch=1, heads=2, d=72, dv=None, dtype=torch.bfloat16, seed=0)
@example(config=(2100, 16, (8, 8)), batch=1, heads=1, d=16, dv=24, dtype=torch.float32, seed=1)
def test_rust_matches_reference_given_indices(config, batch, heads, d, dv, dtype, seed):
    num_tokens, block_size, topks = config
    q, k, v = random_qkv(batch, heads, num_tokens, d, Dv=dv, dtype=dtype, seed=seed, token_major=seed % 2 == 0)
    indices = reference_indices(q, k, block_size, topks)
    scale = d**-0.5
    compare_with_reference("llsa rust", rust_attend(indices, block_size, topks, scale),
                           reference_attend(indices, block_size, topks, scale), (q, k, v), seed=seed)


@pytest.mark.parametrize("num_tokens, block_size, topks", [(37, 4, (3,)), (37, 4, (3, 2)), (70, 3, (2, 2, 1)),
                                                           (64, 4, (4, 2, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pooling", ["children", "tokens"])
def test_gradients_at_every_level(num_tokens, block_size, topks, dtype, pooling):
    """L = 1, 2, 3: k and v get gradient through the fine keys and through the pooled tokens of every level (the
    mean-pool backward of either pooling rule); values with a large mean make the pooled contributions dominate,
    so a wrong weight at any level fails."""
    q, k, v = random_qkv(2, 1, num_tokens, 16, Dv=8, dtype=dtype, seed=len(topks))
    v = (v.float() + 3.0).to(dtype)
    indices = reference_indices(q, k, block_size, topks)
    compare_with_reference(f"llsa rust L={len(topks)} {pooling}", rust_attend(indices, block_size, topks, 0.25, pooling),
                           reference_attend(indices, block_size, topks, 0.25, pooling), (q, k, v))


@pytest.mark.parametrize("batch, heads, threads", [(1, 1, 2), (1, 3, 2), (2, 2, 1), (2, 3, 2)])
def test_backward_one_pass_and_two_pass(batch, heads, threads):
    """The CPU backward runs one pass per (b, h) slice when there are at least two slices per thread and two
    passes (query side, then key side) otherwise; both give the reference's gradients (a grid with text, L = 2)."""
    grid = difattn.TokenGrid(9, 7, text_tokens=5)
    with torch_threads(threads):
        q, k, v = random_qkv(batch, heads, grid.num_tokens, 24, seed=batch * 10 + heads, token_major=True)
        _, indices = difattn.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid,
                                            return_indices=True, backend="rust")
        compare_with_reference(
            f"llsa rust backward {batch}x{heads}/{threads}",
            lambda q, k, v: difattn.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid,
                                                   backend="rust"),
            lambda q, k, v: reference.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid,
                                                     scale=24**-0.5, indices=indices),
            (q, k, v),
        )


def near_tie(q, k, block_size, topks, tol=1e-4) -> bool:
    """Whether any query's top-K at any level is decided by a score gap below ``tol`` (relative), in which case
    a different summation order may legitimately pick differently."""
    queries, keys = _pyramid(q, block_size, len(topks), True), _pyramid(k, block_size, len(topks), True)
    chosen = reference_indices(q, k, block_size, topks)
    for level in range(len(topks), 0, -1):
        scores = (queries[level - 1].double() @ keys[level - 1].double().transpose(-1, -2))
        if level < len(topks):
            scores = scores.masked_fill(~_candidate_mask(chosen[level], scores.shape[-1], block_size), float("-inf"))
        top = torch.sort(scores, dim=-1, descending=True).values[..., : topks[level - 1] + 1]
        gaps = (top[..., :-1] - top[..., 1:]).abs()
        if bool((gaps < tol * max(1.0, float(scores.abs().masked_fill(scores.isinf(), 0).max()))).any()):
            return True
    return False


@settings(max_examples=15)
@given(config=configs(max_tokens=200),
       grid=st.none() | token_grids(max_side=12, max_frames=2, max_text=100, max_tokens=200),
       seed=st.integers(0, 9999))
@example(config=(2100, 16, (8, 8)), grid=None, seed=2)
@example(config=(397, 16, (8,)), grid=difattn.TokenGrid(16, 20, text_tokens=77, text_position="last"), seed=3)
def test_selection_equals_reference(config, grid, seed):
    num_tokens, block_size, topks = config
    if grid is not None:
        num_tokens = grid.num_tokens
        try:
            llsa_config(num_tokens, block_size, topks, len(topks))
        except ValueError:
            assume(False)
    q, k, v = random_qkv(2, 2, num_tokens, 12, seed=seed)
    qi, ki = (q, k) if grid is None else (x[:, :, zorder_permutation(grid)] for x in (q, k))  # internal order
    assume(not near_tie(qi, ki, block_size, topks))
    _, ours = difattn.llsa_attention(q, k, v, block_size=block_size, topk=topks, levels=len(topks), grid=grid,
                                     return_indices=True, backend="rust")
    expected = reference_indices(q, k, block_size, topks, grid)
    assert [x.dtype for x in ours] == [torch.int64] * len(topks)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    layout = llsa_plan.Layout(num_tokens, block_size, topks)
    torch_path = llsa_plan.select(*(llsa_plan.pyramid(x, block_size, len(topks), True) for x in (qi, ki)), layout)
    assert all(torch.equal(a, b) for a, b in zip(torch_path, expected))  # the selection GPUs run


@pytest.mark.parametrize("num_tokens, block_size, topks", [(64, 4, (3, 2)), (256, 4, (2, 2, 3)), (128, 2, (2, 3, 2))])
@pytest.mark.parametrize("path", ["rust", "triton"])  # the selections each backend runs (triton: torch ops)
def test_selection_breaks_exact_ties_like_the_reference(num_tokens, block_size, topks, path):
    """Small integers with power-of-two counts make every pooled value and score exact, with many exact ties; both
    selections (Rust on CPU, torch ops elsewhere) must break them as the reference does."""
    gen = torch.Generator().manual_seed(num_tokens)
    q, k = (torch.randint(-2, 3, (1, 2, num_tokens, 4), generator=gen).float() for _ in range(2))
    layout = llsa_plan.Layout(num_tokens, block_size, topks)
    queries, keys = (llsa_plan.pyramid(x, block_size, len(topks), True) for x in (q, k))
    ours = launcher("llsa_select", path)(queries, keys, layout)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference_indices(q, k, block_size, topks)))


@pytest.mark.parametrize("grid", [difattn.TokenGrid(13, 11, text_tokens=9, text_position="first"),
                                  difattn.TokenGrid(6, 7, frames=2, text_tokens=5, text_position="last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grid_with_text_matches_reference(grid, dtype):
    """The public function with a grid: Z-order in, caller's order out, the returned indices reproduce it."""
    q, k, v = random_qkv(1, 2, grid.num_tokens, 72, dtype=dtype, seed=5, token_major=True)
    _, indices = difattn.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid,
                                        return_indices=True, backend="rust")
    assert [x.shape for x in indices] == [(1, 2, n, kk) for n, kk in
                                          zip(llsa_level_sizes(grid.num_tokens, 4, 2)[1:], (3, 2))]
    compare_with_reference(
        "llsa rust grid",
        lambda q, k, v: difattn.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid,
                                               backend="rust"),
        lambda q, k, v: reference.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid,
                                                 scale=72**-0.5, indices=indices),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, block_size, levels", [(1037, 4, 3), (50, 5, 1), (700, 3, 2)])
@pytest.mark.parametrize("children", [True, False])
def test_zorder_pool_is_the_pyramid_of_the_permuted_rows(num_tokens, block_size, levels, dtype, children):
    """The Rust pooling pass, reading rows through the permutation in place (token-major strides here), equals
    ``llsa_plan.pyramid`` of ``x[:, :, perm]`` under either pooling rule; bad row ids and a missing level are
    errors."""
    x = random_qkv(2, 3, num_tokens, 72, dtype=dtype, seed=num_tokens, token_major=True)[0]
    perm = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(1))
    pooled = llsa_op.llsa_zorder_pool(x, perm, block_size, levels, children)
    expected = torch.cat(llsa_plan.pyramid(x[:, :, perm], block_size, levels, children), dim=2)
    torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="row ids"):
        llsa_op.llsa_zorder_pool(x, perm + 1, block_size, levels, children)
    with pytest.raises(ValueError, match="levels >= 1"):
        llsa_op.llsa_zorder_pool(x, perm, block_size, 0, children)


def test_rust_zorder_equals_reference_zorder():

    for grid in (difattn.TokenGrid(13, 11, text_tokens=9), difattn.TokenGrid(5, 30, frames=3, text_tokens=4,
                                                                            text_position="last")):
        assert torch.equal(zorder(grid)[0], zorder_permutation(grid))


def test_topk_of_every_block_is_attention_over_all_tokens_and_pooled_tokens():
    """Exactness: L = 1 with K_1 = every block is one softmax over all fine tokens and all level-1 tokens."""
    q, k, v = random_qkv(1, 2, 45, 16, dtype=torch.float64, seed=3)
    n1 = math.ceil(45 / 4)
    keys = torch.cat([k, _pyramid(k, 4, 1, True)[0]], dim=2)
    values = torch.cat([v, _pyramid(v, 4, 1, True)[0]], dim=2)
    bias = torch.log(torch.cat([torch.ones(45), _counts(45, 4, 1, "cpu").double()]))[None, :]
    dense = masked_attention(q, keys, values, scale=0.25, bias=bias)
    low = masked_attention(*(x.float() for x in (q, keys, values)), scale=0.25, bias=bias.float())
    out = difattn.llsa_attention(*(x.float() for x in (q, k, v)), block_size=4, topk=(n1,), levels=1, backend="rust")
    difattn.testing.assert_close("all blocks", out, low, dense)


def test_default_levels_and_auto_backend():
    from difattn.backends import BACKENDS, select

    assert select("llsa", "auto", torch.device("cpu")) is BACKENDS["rust"].implementations["llsa"]
    q, k, v = random_qkv(1, 1, 1000, 16, seed=1)
    _, indices = difattn.llsa_attention(q, k, v, block_size=2, topk=2, return_indices=True)
    assert len(indices) == 2  # 1000 / 2**2 = 250 <= 256 coarse tokens


def test_rust_rejects_bad_selections_and_dtypes():
    q, k, v = random_qkv(1, 1, 37, 8, seed=2)
    layout = llsa_plan.Layout(37, 4, (3, 2))
    indices = reference_indices(q, k, 4, (3, 2))
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, "cpu")
    kp = llsa_plan.pooled(_pyramid(k, 4, 2, True), k.dtype)
    vp = llsa_plan.pooled(_pyramid(v, 4, 2, True), v.dtype)
    bad_fine = fine.clone()
    bad_fine[0, 0, 0, 0] = 10  # 10 fine blocks
    bad_pooled = pooled.clone()
    bad_pooled[0, 0, 3, 1] = -1
    cases = (([bad_fine, pooled, offsets, bias], "fine"), ([fine, bad_pooled, offsets, bias], "pooled"),
             ([fine, pooled, offsets * 2, bias], "pb_offsets"), ([fine, pooled, offsets, bias[:-1]], "pbias"),
             ([fine.long(), pooled, offsets, bias], "int32"))
    for plan, match in cases:
        with pytest.raises(ValueError, match=match):
            llsa_op.llsa_fwd(q, k, v, kp, vp, plan, 4, [3, 2], True, 0.3, "rust")
    with pytest.raises(ValueError, match="kp"):
        llsa_op.llsa_fwd(q, k, v, kp[:, :, :-1], vp, [fine, pooled, offsets, bias], 4, [3, 2], True, 0.3, "rust")
    with pytest.raises(RuntimeError, match="float64"):
        difattn.llsa_attention(q.double(), k.double(), v.double(), block_size=4, topk=(3, 2), levels=2,
                               backend="rust")


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_opcheck_and_compile_fullgraph_on_cpu():
    q, k, v = random_qkv(1, 2, 50, 16, seed=4, requires_grad=True)
    layout = llsa_plan.Layout(50, 4, (3, 2))
    indices = reference_indices(q.detach(), k.detach(), 4, (3, 2))
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, "cpu")
    kp = llsa_plan.pooled(_pyramid(k, 4, 2, True), k.dtype).detach().requires_grad_()
    vp = llsa_plan.pooled(_pyramid(v, 4, 2, True), v.dtype).detach().requires_grad_()
    torch.library.opcheck(llsa_op.llsa_fwd, (q, k, v, kp, vp, [fine, pooled, offsets, bias], 4, [3, 2], True, 0.25,
                                             "rust"))

    grid = difattn.TokenGrid(5, 9, text_tokens=5)  # 50 tokens

    def run(q, k, v):
        return difattn.llsa_attention(q, k, v, block_size=4, topk=(3, 2), levels=2, grid=grid, backend="rust")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")  # traces the ops; no C++ build needed
    torch.testing.assert_close(compiled(q, k, v), run(q, k, v))


@pytest.mark.parametrize("num_tokens, block_size, topks", [(3000, 4, (3, 2, 2)), (2500, 5, (2, 3)), (700, 3, (4,))])
@pytest.mark.parametrize("children", [True, False])
def test_key_side_plans_cover_exactly_the_forward_pairs(num_tokens, block_size, topks, children):
    """The Triton key side: the CSR transpose lists every (fine key block, query block) pair of the selection once,
    in increasing query order; the pooled items cover every (query token, pooled block) pair of the forward once
    (several query chunks at the coarsest level here); ``unpool`` is the pyramid's backward."""
    q, k = (torch.randn(2, 1, num_tokens, 8, generator=torch.Generator().manual_seed(i)) for i in range(2))
    layout = llsa_plan.Layout(num_tokens, block_size, topks, children)
    indices = llsa_plan.select(*(llsa_plan.pyramid(x, block_size, len(topks), children) for x in (q, k)), layout)
    fine, pooled = llsa_plan.block_lists(indices, layout)
    indptr, chosen_by = llsa_plan.transpose(fine, layout.num_blocks)
    for bh in range(2):
        pairs = {(int(p), j) for j in range(layout.num_blocks) for p in fine.view(2, layout.num_blocks, -1)[bh, j]}
        listed = [(p, int(chosen_by[bh, e])) for p in range(layout.num_blocks)
                  for e in range(int(indptr[bh, p]), int(indptr[bh, p + 1]))]
        assert sorted(listed) == listed and len(listed) == len(pairs) and set(listed) == pairs
    ranges, blocks = llsa_plan.pooled_items(pooled, layout)
    tokens = torch.arange(num_tokens)
    for bh in range(2):
        forward = torch.zeros(num_tokens, pooled.max() + 1, dtype=torch.int64)
        forward.scatter_add_(1, pooled.view(2, layout.num_blocks, -1)[bh][tokens // block_size],
                             torch.ones(num_tokens, pooled.shape[-1], dtype=torch.int64))
        items = torch.zeros_like(forward)
        for (start, stop), block in zip(ranges.tolist(), blocks[bh].tolist()):
            items[start:stop, block] += 1
        assert torch.equal(items, forward)
    x = torch.randn(1, 2, num_tokens, 3, dtype=torch.float64, requires_grad=True)
    grads = torch.randn(1, 2, layout.pooled_tokens, 3, dtype=torch.float64)
    (torch.cat(llsa_plan.pyramid(x, block_size, len(topks), children), dim=2) * grads).sum().backward()
    torch.testing.assert_close(llsa_plan.unpool(grads, layout).double(), x.grad, rtol=1e-6, atol=1e-6)
