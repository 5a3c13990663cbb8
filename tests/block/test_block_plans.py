"""The block engine's plans (CLEAR, GRAT): every allowed pair covered exactly once against the spec's masks,
full entries really full, the counts of the papers' settings, the plan cache, the plan keys the ops carry, the
Rust launcher's validation and the custom ops under ``opcheck`` and ``torch.compile``."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import difattn
from difattn import reference
from difattn.ops.block import op as block_op
from difattn.ops.block import rust_launch
from difattn.ops.block.plan import (
    CPU_BLOCKS,
    GPU_BLOCKS,
    GPU_BLOCKS_WIDE_HEADS,
    BlockPlanKey,
    BlockShape,
    block_plan,
    clear_plan_key,
    grat_plan_key,
    kernel_blocks,
)
from difattn.ops.clear import clear_on_blocks
from difattn.testing import assert_close, compare_with_reference, random_qkv, torch_threads
from difattn.testing.strategies import disc_radii, token_grids

from compile_first import run_fresh

SMALL_BLOCKS = BlockShape((2, 4), (4, 2))  # ragged tiles everywhere on small grids
CPU = torch.device("cpu")


def clear_plan(grid, radius, temporal_radius, global_tokens, blocks):
    return block_plan(clear_plan_key(grid, radius, temporal_radius, global_tokens, blocks), CPU)


def grat_plan(grid, group, pattern, reach, text_masked, blocks):
    return block_plan(grat_plan_key(grid, group, pattern, reach, text_masked, blocks), CPU)


def plan_pairs(plan, mask_fn):
    """Dense (N, Nk) coverage of a plan: 1 where an entry covers the pair, and whether FULL entries are full."""
    q_perm, q_off, k_perm, k_off = plan.q_perm, plan.q_offsets, plan.k_perm, plan.k_offsets
    covered = torch.zeros(q_perm.numel(), k_perm.numel(), dtype=torch.int64)
    full_ok = True
    indptr, indices, kinds = plan.indptr, plan.indices, plan.kinds
    for i in range(plan.num_query_blocks):
        rows = q_perm[q_off[i] : q_off[i + 1]]
        for e in range(int(indptr[i]), int(indptr[i + 1])):
            j = int(indices[e])
            cols = k_perm[k_off[j] : k_off[j + 1]]
            allowed = mask_fn(rows, cols)
            covered[rows[:, None], cols[None, :]] += allowed.long() if kinds[e] else 1
            full_ok &= bool(kinds[e]) or bool(allowed.all())
    return covered, full_ok

@given(grid=token_grids(max_side=14, max_text=300, max_tokens=400), radius=disc_radii(9.0),
       rt=st.sampled_from([None, 1.0, 2.0, 2.5]), blocks=st.sampled_from([SMALL_BLOCKS, CPU_BLOCKS, GPU_BLOCKS]))
# 300 text tokens: three 128-token GPU blocks, the last one ragged; r = 8 on the GPU tiles; rt = 2 across frames.
@example(grid=difattn.TokenGrid(9, 11, text_tokens=300), radius=8.0, rt=None, blocks=GPU_BLOCKS)
@example(grid=difattn.TokenGrid(5, 7, frames=3, text_tokens=3, text_position="last"), radius=3.0, rt=2.0,
         blocks=CPU_BLOCKS)
def test_clear_plan_equals_spec_mask(grid, radius, rt, blocks):
    rt_value = float(grid.frames) if rt is None else rt
    mask = reference.clear_mask(grid, radius, temporal_radius=rt)
    plan = clear_plan(grid, radius, rt_value, 0, blocks)
    covered, full_ok = plan_pairs(plan, lambda r, c: mask[r[:, None], c[None, :]])
    assert full_ok
    assert torch.equal(covered, mask.long())  # every allowed pair exactly once, nothing else

@given(grid=token_grids(max_side=14, max_text=300, max_tokens=400),
       pattern=st.sampled_from(["neighbors", "criss_cross"]),
       group=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)), reach=st.integers(0, 2),
       blocks=st.sampled_from([SMALL_BLOCKS, CPU_BLOCKS]))
def test_grat_plan_equals_spec_mask_and_is_all_full(grid, pattern, group, reach, blocks):
    mask = reference.grat_mask(grid, group, pattern, reach)
    plan = grat_plan(grid, group, pattern, reach, False, blocks)
    assert int(plan.kinds.sum()) == 0
    covered, full_ok = plan_pairs(plan, lambda r, c: mask[r[:, None], c[None, :]])
    assert full_ok and torch.equal(covered, mask.long())

def test_clear_plan_check_values_flux_1024():
    """FLUX 1024² (64x64 grid, 512 text, head dim 128, 24 heads): the plan's allowed pairs give the spec's FLOPs."""
    grid = difattn.TokenGrid(64, 64, text_tokens=512)
    for radius, gflops in ((8, 63.5), (16, 86.6), (32, 154.1)):
        plan = clear_plan(grid, float(radius), 1.0, 0, GPU_BLOCKS)
        pairs = _allowed_pairs(plan)
        assert round(4 * pairs * 3072 / 1e9, 1) == gflops
        computed = plan.computed_pairs()
        assert computed >= pairs

def _allowed_pairs(plan) -> int:
    qc, kc = plan.q_coords.view(-1, 3), plan.k_coords.view(-1, 3)
    total = 0
    indptr, indices, kinds, q_off, k_off = plan.indptr, plan.indices, plan.kinds, plan.q_offsets, plan.k_offsets
    rows_of = torch.repeat_interleave(torch.arange(plan.num_query_blocks), indptr.diff())
    full = kinds == 0
    total += int((q_off.diff()[rows_of[full]] * k_off.diff()[indices[full]]).sum())
    for e in torch.nonzero(~full).flatten().tolist():
        i, j = int(rows_of[e]), int(indices[e])
        a, b = qc[q_off[i] : q_off[i + 1]], kc[k_off[j] : k_off[j + 1]]
        d2 = (a[:, None, 1] - b[None, :, 1]) ** 2 + (a[:, None, 2] - b[None, :, 2]) ** 2
        dt = (a[:, None, 0] - b[None, :, 0]).abs()
        text = (a[:, None, 0] < 0) | (b[None, :, 0] < 0)
        total += int((text | ((d2 <= plan.max_d2) & (dt <= plan.max_dt))).sum())
    return total

def test_plan_cache_is_keyed_by_grid():
    a = clear_plan(difattn.TokenGrid(8, 8), 3.0, 1.0, 0, CPU_BLOCKS)
    b = clear_plan(difattn.TokenGrid(16, 16), 3.0, 1.0, 0, CPU_BLOCKS)
    c = clear_plan(difattn.TokenGrid(8, 8), 3.0, 1.0, 0, CPU_BLOCKS)
    assert a.q_perm.numel() == 64 and b.q_perm.numel() == 256 and a is c

def test_kernel_blocks_by_head_dim():
    """Triton plans use 64-query blocks for heads wider than 128 (their backward tiles fit an A100's shared memory),
    128 otherwise; the CPU engine's blocks do not depend on the head dim."""
    assert [kernel_blocks("triton", d).q_block for d in (64, 72, 128, 136, 256)] == [128, 128, 128, 64, 64]
    assert kernel_blocks("triton", 256) == GPU_BLOCKS_WIDE_HEADS and kernel_blocks("triton", 128) == GPU_BLOCKS
    assert {kernel_blocks("rust", d) for d in (32, 128, 256)} == {CPU_BLOCKS}

@pytest.mark.parametrize("batch, heads, threads", [(1, 1, 2), (2, 3, 1), (2, 2, 2)])
def test_backward_one_pass_and_two_pass(batch, heads, threads):
    """The CPU backward runs one pass per (b, h) slice when there are at least two slices per thread and two
    passes otherwise; both give the reference's gradients (CLEAR with masked rim blocks, GRAT with a text mask)."""
    grid = difattn.TokenGrid(7, 9, text_tokens=5)
    text_mask = torch.tensor([[True, True, False, True, False]] * batch)
    with torch_threads(threads):
        q, k, v = random_qkv(batch, heads, grid.num_tokens, 24, seed=batch * 10 + heads)
        compare_with_reference(
            f"clear rust backward {batch}x{heads}/{threads}",
            lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=2.5, backend="rust"),
            lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=2.5, scale=24**-0.5),
            (q, k, v),
        )
        compare_with_reference(
            f"grat rust backward {batch}x{heads}/{threads}",
            lambda q, k, v: difattn.grat_attention(q, k, v, grid, group=(2, 3), text_mask=text_mask, backend="rust"),
            lambda q, k, v: reference.grat_attention(q, k, v, grid, group=(2, 3), text_mask=text_mask, scale=24**-0.5),
            (q, k, v),
        )

@pytest.mark.parametrize("radius", [1.0, 3.0, math.sqrt(5), 2.1])
def test_rust_engine_disc_mask_at_integer_and_square_root_radii(radius):
    """The CPU engine's own element mask on rim blocks (public CLEAR on CPU runs the disc kernels instead): r = 1
    keeps the query alone, 3 keeps d² = 8, √5 keeps d² = 5, 2.1 keeps (2, 0) but not (2, 1)."""
    grid = difattn.TokenGrid(19, 22, text_tokens=5)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, seed=3)
    compare_with_reference(
        f"clear on the rust engine r={radius:g}",
        lambda q, k, v: clear_on_blocks(q, k, v, grid, radius=radius, temporal_radius=1.0, scale=0.25, backend="rust"),
        lambda q, k, v: reference.clear_attention(q, k, v, grid, radius=radius, scale=0.25),
        (q, k, v),
    )

def test_compile_fullgraph_with_grids_from_outside_and_inside():
    """CLEAR and GRAT trace whole under torch.compile(fullgraph=True): the plans are custom ops (static grids use
    the real plan's sizes, symbolic ones data-dependent sizes). In a fresh process, every compiled call runs before
    any eager one (an eager call first would build and cache the plans the trace then finds); then forward and
    gradients equal eager for grids passed in (new, equal objects each call) and grids built inside the compiled
    function; a changed grid recompiles at most once more (to dynamic sizes), never silently reusing a stale plan."""
    run_fresh("""
        import torch
        import torch._dynamo.testing

        import difattn
        from difattn.testing import random_qkv

        def clear_plus_grat(q, k, v, grid):
            return (difattn.clear_attention(q, k, v, grid, radius=2.5)
                    + difattn.grat_attention(q, k, v, grid, group=(2, 3)))

        passed_in = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        built_inside = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        outside = torch.compile(clear_plus_grat, fullgraph=True, backend=passed_in)

        @torch.compile(fullgraph=True, backend=built_inside)
        def inside(q, k, v, height):
            return clear_plus_grat(q, k, v, difattn.TokenGrid(height, 7, text_tokens=3))

        def run(fn, seed, height, arg):
            q, k, v = (x.requires_grad_() for x in random_qkv(1, 2, 7 * height + 3, 16, seed=seed))
            out = fn(q, k, v, arg)
            return out.detach(), torch.autograd.grad(out.square().sum(), (q, k, v))

        cases = list(enumerate([6, 6, 5, 4]))
        compiled = [(run(outside, s, h, difattn.TokenGrid(h, 7, text_tokens=3)), run(inside, s, h, h))
                    for s, h in cases]
        for (s, h), runs in zip(cases, compiled):
            want, want_grads = run(clear_plus_grat, s, h, difattn.TokenGrid(h, 7, text_tokens=3))
            for got, got_grads in runs:
                torch.testing.assert_close(got, want)
                for g, w in zip(got_grads, want_grads):
                    torch.testing.assert_close(g, w)
        assert passed_in.frame_count <= 2 and built_inside.frame_count <= 3, (passed_in.frame_count,
                                                                              built_inside.frame_count)
        """)

@pytest.mark.parametrize("grid", [difattn.TokenGrid(64, 64), difattn.TokenGrid(30, 52, text_tokens=77, text_position="last")])
def test_exactness_window_covering_everything_equals_dense(grid):
    q, k, v = random_qkv(1, 2, grid.num_tokens, 64, seed=7, dtype=torch.float64)
    dense = reference.dense_attention(q, k, v)
    for dtype in (torch.float32,):
        qd, kd, vd = (x.to(dtype) for x in (q, k, v))
        clear = difattn.clear_attention(qd, kd, vd, grid, radius=float(grid.height + grid.width), backend="rust")
        grat = difattn.grat_attention(qd, kd, vd, grid, group=(grid.height, grid.width), backend="rust")
        low = reference.dense_attention(qd, kd, vd)
        assert_close("clear covering", clear, low, dense)
        assert_close("grat covering", grat, low, dense)


def test_rust_kernels_reject_a_plan_or_validity_that_does_not_fit_the_tensors():
    """A plan is the core's own validated object (Python cannot hand it arrays); the kernels still check it against
    the tensors they get, and the key validity's size, before any unsafe read."""
    plan = clear_plan(difattn.TokenGrid(4, 4), 2.0, 1.0, 0, CPU_BLOCKS)
    q, k, v = random_qkv(1, 1, 20, 8)
    with pytest.raises(ValueError, match="plan does not match"):
        rust_launch.forward(q, k, v, plan, None, 0.3)
    q, k, v = random_qkv(2, 1, 16, 8)
    with pytest.raises(ValueError, match="key_valid"):
        rust_launch.forward(q, k, v, plan, torch.ones(1, 16, dtype=torch.bool), 0.3)


@pytest.mark.parametrize("method", ["clear", "grat"])
def test_opcheck_block_attention_cpu(method):
    grid = difattn.TokenGrid(6, 7, text_tokens=3)
    if method == "clear":
        key, valid = clear_plan_key(grid, 2.0, 1.0, 0, SMALL_BLOCKS), None
    else:
        key = grat_plan_key(grid, (1, 2, 3), "neighbors", 1, True, SMALL_BLOCKS)
        valid = torch.tensor([[True, False, True] + [True] * grid.image_tokens])
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, requires_grad=True)
    torch.library.opcheck(block_op.block_attention_fwd, (q, k, v, valid, *key.op_args(), 0.25, "rust"))
    out, lse = block_op.block_attention_fwd(q, k, v, valid, *key.op_args(), 0.25, "rust")
    dout = torch.randn_like(out)
    torch.library.opcheck(block_op.block_attention_bwd,
                          (q.detach(), k.detach(), v.detach(), out.detach(), dout, lse.detach(), valid,
                           *key.op_args(), 0.25, "rust"))


def test_plan_keys_round_trip_and_bound_every_block():
    """A key survives the op's arguments unchanged, and the plan it builds holds no block larger than its block
    shape (the Triton tiles are sized from ``max_blocks``)."""
    for grid in [difattn.TokenGrid(5, 9, text_tokens=3), difattn.TokenGrid(4, 6, frames=2, text_tokens=70,
                                                                           text_position="last")]:
        for blocks in (CPU_BLOCKS, GPU_BLOCKS, GPU_BLOCKS_WIDE_HEADS):
            for key in (clear_plan_key(grid, 2.5, 1.0, 3, blocks), clear_plan_key(grid, 0.5, 0.7, 0, blocks),
                        grat_plan_key(grid, (1, 2, 3), "criss_cross", 0, True, blocks),
                        grat_plan_key(grid, (2, 2, 2), "neighbors", 2, False, blocks)):
                assert BlockPlanKey.from_op_args(*key.op_args()) == key
                plan = block_plan(key, CPU)
                assert plan.max_blocks == (int(plan.q_offsets.diff().max()), int(plan.k_offsets.diff().max()))
                assert plan.max_blocks[0] <= blocks.q_block and plan.max_blocks[1] <= blocks.k_block
