"""PISA on the Rust kernels (tier 0): layout and routing exactly as the reference; forward and every gradient
against the reference given the same selected blocks, through the one tolerance helper; exactness properties;
the late centroid that raises the running max; the order="first" delegation; bad selections; opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import difattn
from difattn import reference
from difattn._native import core
from difattn._options import pisa_routing_bias
from difattn.ops._base.descriptors import tensor_desc
from difattn.ops.pisa import rust_launch
from difattn.ops.pisa.layout import pisa_layout
from difattn.ops.pisa.method import pisa_on_kernels
from difattn.ops.pisa.op import pisa_fwd
from difattn.ops.pisa.stats import block_stats, pisa_stats, pisa_top_blocks, route, score_bias, torch_stats
from difattn.reference.pisa import pisa_layout as reference_layout
from difattn.testing import assert_close, assert_finite, compare_with_reference, nan_poisoned, random_qkv
from difattn.testing.strategies import head_dims, token_grids
from pisa_cases import late_centroid_case

ORDERS = ("zeroth", "hybrid")


def fast(q, k, v, *, backend="rust", **options):
    """The kernel path with every option spelled out and resolved as the public function resolves them (``blocks``
    passes a selection, as the reference takes)."""
    full = dict(density=0.125, block_size=64, order="hybrid", routing_bias=False, sink=None, grid=None,
                return_blocks=False, scale=q.shape[-1] ** -0.5)
    full.update(options)
    full["routing_bias"] = pisa_routing_bias(full["routing_bias"])
    return pisa_on_kernels(q, k, v, backend=backend, **full)


def compare_given_blocks(name, q, k, v, *, backend="rust", **options):
    """Routes on the kernel path, checks the selection against the reference's (when asked), then compares forward
    and gradients of both given that selection."""
    scale = options.pop("scale", q.shape[-1] ** -0.5)
    _, blocks = fast(q, k, v, backend=backend, return_blocks=True, scale=scale, **options)
    compare_with_reference(
        name,
        lambda q, k, v: fast(q, k, v, backend=backend, blocks=blocks, scale=scale, **options),
        lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, scale=scale, **options),
        (q, k, v),
    )
    return blocks


@st.composite
def pisa_shapes(draw, max_tokens: int = 260):
    """``(grid or None, N, block_size)``: odd grids with text before or after, N not a multiple of the block."""
    block_size = draw(st.sampled_from([4, 8, 16, 64, 128]))
    grid = draw(st.none() | token_grids(max_side=17, max_frames=2, max_text=200, max_tokens=max_tokens))
    num_tokens = grid.num_tokens if grid is not None else draw(st.integers(1, max_tokens))
    return grid, num_tokens, block_size


@pytest.mark.parametrize("block_size", [4, 8, 64, 128])
@pytest.mark.parametrize("grid", [None, difattn.TokenGrid(13, 45, frames=2, text_tokens=70),
                                  difattn.TokenGrid(30, 52, text_tokens=9, text_position="last")])
def test_layout_is_the_reference_layout(grid, block_size):
    num_tokens = grid.num_tokens if grid is not None else 1000
    layout = pisa_layout(grid, num_tokens, block_size, "cpu")
    perm, sizes = reference_layout(grid, num_tokens, block_size)
    assert torch.equal(layout.perm, perm if perm is not None else torch.arange(num_tokens))
    assert torch.equal(layout.counts, sizes)
    assert torch.equal(layout.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]))


@given(shape=pisa_shapes(), d=head_dims(), order=st.sampled_from(ORDERS),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       density=st.sampled_from([0.05, 0.2, 0.5]), sink=st.sampled_from([None, "first", "last"]),
       seed=st.integers(0, 99))
# The defaults (block 64, density 0.125) and block 128 (8x16 tiles) with FLUX's 512 text tokens first (four and eight
# text blocks); text last with the last block as sink (HunyuanVideo's setting).
@example(shape=(difattn.TokenGrid(16, 24, text_tokens=512), 896, 128), d=128, order="hybrid", dtype=torch.bfloat16,
         density=0.2, sink=None, seed=0)
@example(shape=(difattn.TokenGrid(16, 24, text_tokens=512), 896, 64), d=64, order="zeroth", dtype=torch.float32,
         density=0.125, sink="first", seed=1)
@example(shape=(difattn.TokenGrid(6, 20, frames=2, text_tokens=70, text_position="last"), 310, 64), d=72,
         order="hybrid", dtype=torch.float16, density=0.125, sink="last", seed=2)
def test_rust_matches_reference_given_blocks(shape, d, order, dtype, density, sink, seed):
    grid, num_tokens, block_size = shape
    q, k, v = random_qkv(1, 2, num_tokens, d, Dv=d if seed % 3 else 40, dtype=dtype, seed=seed,
                         token_major=seed % 2 == 0)
    compare_given_blocks(f"pisa rust {order}", q, k, v, density=density, block_size=block_size, order=order,
                         sink=sink, grid=grid)


@settings(max_examples=12)
@given(shape=pisa_shapes(), density=st.sampled_from([0.05, 0.2, 0.5, 0.7, 1.0]),
       sink=st.sampled_from([None, "first", "last"]), seed=st.integers(0, 2**16))
def test_routing_equals_reference(shape, density, sink, seed):
    """fp32 end to end (the statistics are the same arithmetic as the reference's): equal selections."""
    grid, num_tokens, block_size = shape
    q, k, v = random_qkv(2, 2, num_tokens, 8, Dv=6, seed=seed)
    kw = dict(density=density, block_size=block_size, sink=sink, grid=grid, scale=0.35)
    _, blocks = fast(q, k, v, return_blocks=True, **kw)
    _, expected = reference.pisa_attention(q, k, v, return_blocks=True, **kw)
    assert blocks.dtype == torch.int64 and torch.equal(blocks, expected)


@settings(max_examples=30)
@given(rows=st.integers(1, 5), mk=st.integers(1, 70), levels=st.integers(1, 6), seed=st.integers(0, 2**16),
       data=st.data())
def test_rust_top_blocks_equal_a_stable_sort(rows, mk, levels, seed, data):
    """The core's selection (difattn::pisa_top_blocks) gives the ids and the order of torch's stable descending
    sort exactly: scores from a few levels (long ties), ±inf, NaN and ±0, on a transposed (strided) score."""
    num_selected = data.draw(st.integers(1, mk))
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    score = torch.randint(0, levels, (2, 3, mk, rows), generator=g).float() * 0.5 - 1.0
    mask = torch.rand(score.shape, generator=g) < 0.1
    score[mask] = specials[torch.randint(0, 5, (int(mask.sum()),), generator=g)]
    score = score.transpose(-1, -2)
    expected = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :num_selected]
    assert torch.equal(pisa_top_blocks(score, num_selected), expected)


@settings(max_examples=12)
@given(shape=pisa_shapes(max_tokens=160), density=st.sampled_from([0.1, 0.3]), sink=st.sampled_from([None, "last"]),
       seed=st.integers(0, 2**16))
def test_routing_bias_equals_reference_in_float64(shape, density, sink, seed):
    """The torch statistics (the Gram-matrix form of ‖H_j − c·H̄‖_F, the masked key variance) route like the
    reference's explicit moments (float64, where rounding cannot flip a tie), for every routing bias."""
    grid, num_tokens, block_size = shape
    q, k, v = random_qkv(1, 2, num_tokens, 8, Dv=6, dtype=torch.float64, seed=seed)
    layout = pisa_layout(grid, num_tokens, block_size, "cpu")
    num_selected = max(1, math.floor(density * layout.num_blocks))
    for bias in ("centered", "uncentered", "key_variance"):
        key_mean, _, _, query_mean, statistic = torch_stats(q, k, v, layout.counts, layout.slots, layout.max_block,
                                                            moments=bias == "centered", bias=bias)
        blocks = route(query_mean, key_mean, 0.3, num_selected, sink=sink, bias=score_bias(statistic, bias))
        _, expected = reference.pisa_attention(q, k, v, density=density, block_size=block_size, routing_bias=bias,
                                               sink=sink, grid=grid, return_blocks=True, scale=0.3)
        assert torch.equal(blocks, expected), bias


@settings(max_examples=12)
@given(shape=pisa_shapes(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_rust_statistics_match_torch(shape, dtype, seed):
    grid, num_tokens, block_size = shape
    q, k, v = random_qkv(2, 2, num_tokens, 24, Dv=20, dtype=dtype, seed=seed, token_major=seed % 2 == 0)
    layout = pisa_layout(grid, num_tokens, block_size, "cpu")
    high_stats = {bias: torch_stats(*(x.double() for x in (q, k, v)), layout.counts, layout.slots,
                                    layout.max_block, moments=True, bias=bias)
                  for bias in ("centered", "uncentered", "key_variance")}
    moment_norms = high_stats["uncentered"][-1].exp()  # ‖H_j‖ + 1e-5
    for bias, high in high_stats.items():
        rust = block_stats(q, k, v, layout, moments=True, bias=bias, backend="rust")
        for name, a, b in zip(("key_mean", "value_mean", "moment_mean", "query_mean"), rust, high):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)
        if bias == "centered":
            # ln(‖H_j − H̄‖ + 1e-5): the difference cancels (to rounding when every block's moment is alike, e.g. a
            # single block), so its error is fp32 rounding of the moments, ~‖H_j‖·1e-7, not of the log.
            torch.testing.assert_close(rust[-1].double().exp(), high[-1].exp(), rtol=1e-5,
                                       atol=1e-5 * float(moment_norms.max()), msg=bias)
        else:
            torch.testing.assert_close(rust[-1].double(), high[-1], rtol=1e-5, atol=1e-5, msg=bias)


@pytest.mark.parametrize("bias", [True, "uncentered", "key_variance"])
@pytest.mark.parametrize("grid", [None, difattn.TokenGrid(9, 11, text_tokens=6, text_position="last")])
def test_routing_bias_fp32_matches_reference(grid, bias):
    num_tokens = grid.num_tokens if grid is not None else 300
    q, k, v = random_qkv(2, 3, num_tokens, 16, seed=5, token_major=True)
    kw = dict(density=0.2, block_size=8, routing_bias=bias, sink="first", grid=grid, scale=0.25)
    for order in ORDERS:
        _, blocks = fast(q, k, v, order=order, return_blocks=True, **kw)
        _, expected = reference.pisa_attention(q, k, v, order=order, return_blocks=True, **kw)
        assert torch.equal(blocks, expected)
    compare_given_blocks(f"pisa rust routing bias {bias}", q, k, v, order="hybrid", **kw)


@pytest.mark.parametrize("d, dv", [(256, 40), (72, 96)])
def test_large_and_uneven_head_dims(d, dv):
    grid = difattn.TokenGrid(10, 13, text_tokens=7)
    q, k, v = random_qkv(1, 2, grid.num_tokens, d, Dv=dv, dtype=torch.bfloat16, seed=d)
    compare_given_blocks(f"pisa rust d={d}", q, k, v, density=0.3, block_size=16, grid=grid)


def dense_pair(q, k, v):
    """Dense attention in the input dtype and in float64 (the exactness targets)."""
    return reference.dense_attention(q, k, v), reference.dense_attention(*(x.double() for x in (q, k, v)))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", [None, difattn.TokenGrid(12, 14, frames=2, text_tokens=5, text_position="last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_density_one_is_dense(grid, order, dtype):
    num_tokens = grid.num_tokens if grid is not None else 333
    q, k, v = random_qkv(1, 2, num_tokens, 64, dtype=dtype, seed=1)
    out = fast(q, k, v, density=1.0, block_size=16, order=order, grid=grid, routing_bias=True)
    assert_close(f"density 1 {order}", out, *dense_pair(q, k, v))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", [None, difattn.TokenGrid(12, 10, text_tokens=9)])
def test_block_constant_keys_are_dense(grid, order):
    num_tokens = grid.num_tokens if grid is not None else 150
    q, _, v = random_qkv(1, 2, num_tokens, 32, dtype=torch.float64, seed=2)
    layout = pisa_layout(grid, num_tokens, 8, "cpu")
    block_keys = torch.randn(1, 2, layout.num_blocks, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    block_of = torch.repeat_interleave(torch.arange(layout.num_blocks), layout.counts)
    k = torch.empty_like(q)
    k[:, :, layout.perm] = block_keys[:, :, block_of]
    q, k, v = (x.float() for x in (q, k, v))
    out = fast(q, k, v, density=0.2, block_size=8, order=order, grid=grid, sink="last")
    assert_close(f"block-constant keys {order}", out, *dense_pair(q, k, v))


def test_late_centroid_raising_the_max_rust():
    num_blocks = 150  # > 2 chunks of 64 centroids: the max rises in the last chunk
    (q, k, v), blocks = late_centroid_case(num_blocks)
    kw = dict(density=1 / num_blocks, block_size=2, order="hybrid", scale=1.0)
    out = fast(q, k, v, blocks=blocks, **kw)
    ref = reference.pisa_attention(q.double(), k.double(), v.double(), blocks=blocks, **kw)
    first_order = ref - reference.pisa_attention(q.double(), k.double(), v.double(), blocks=blocks,
                                                 **{**kw, "order": "zeroth"})
    assert float(first_order.abs().max()) > 0.05  # the term a missing rescale would inflate is not negligible
    compare_with_reference("late centroid", lambda q, k, v: fast(q, k, v, blocks=blocks, **kw),
                           lambda q, k, v: reference.pisa_attention(q, k, v, blocks=blocks, **kw), (q, k, v))
    assert_close("late centroid fwd", out, reference.pisa_attention(q, k, v, blocks=blocks, **kw), ref)


def test_first_order_and_float64_need_the_reference():
    """The kernels implement the zeroth and hybrid orders in fp32/fp16/bf16: asked for the first order or float64,
    backend="rust" raises a RuntimeError saying why, and backend="auto" runs the reference."""
    grid = difattn.TokenGrid(6, 7, text_tokens=3)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, seed=4)
    kw = dict(density=0.3, block_size=4, grid=grid, routing_bias=True, return_blocks=True)
    for x, order, reason in (((q, k, v), "first", "order='first'"),
                             ((q.double(), k.double(), v.double()), "hybrid", "float64")):
        with pytest.raises(RuntimeError, match=reason):
            difattn.pisa_attention(*x, order=order, backend="rust", **kw)
        out, blocks = difattn.pisa_attention(*x, order=order, **kw)
        ref, ref_blocks = reference.pisa_attention(*x, order=order, scale=0.25, **kw)
        assert torch.equal(out, ref) and torch.equal(blocks, ref_blocks)


def test_auto_picks_rust_on_cpu():
    from difattn.backends import BACKENDS, select

    assert select("pisa", "auto", torch.device("cpu")) is BACKENDS["rust"].implementations["pisa"]


def test_public_function_returns_caller_order_and_blocks():
    grid = difattn.TokenGrid(9, 10, text_tokens=4, text_position="last")
    q, k, v = random_qkv(2, 2, grid.num_tokens, 16, seed=6, token_major=True)
    out, blocks = difattn.pisa_attention(q, k, v, density=0.25, block_size=8, grid=grid, return_blocks=True)
    ref = reference.pisa_attention(q, k, v, density=0.25, block_size=8, grid=grid, blocks=blocks, scale=0.25)
    assert out.shape == q.shape and out.dtype == q.dtype and blocks.shape == (2, 2, 16, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_selections_are_rejected():
    q, k, v = random_qkv(1, 2, 20, 4, seed=9)  # block_size 4: M = 5, density 0.4: k = 2
    good = torch.zeros(1, 2, 5, 2, dtype=torch.int64)
    good[..., 1] = 1
    difattn.pisa_attention(q, k, v, density=0.4, block_size=4, blocks=good, backend="rust")
    for bad in (good[..., :1], good + 4, torch.zeros_like(good)):
        with pytest.raises(ValueError, match="blocks"):
            difattn.pisa_attention(q, k, v, density=0.4, block_size=4, blocks=bad, backend="rust")
    with pytest.raises(TypeError, match="blocks"):
        difattn.pisa_attention(q, k, v, density=0.4, block_size=4, blocks=good.int(), backend="rust")
    # The compiled core validates on its own too: repeats and out-of-range ids never reach a kernel.
    layout = pisa_layout(None, 20, 4, "cpu")
    key_mean, value_mean, *_ = block_stats(q, k, v, layout, moments=False, bias=None, backend="rust")
    for bad, message in ((torch.zeros_like(good), "repeats"), (good + 4, "out of range")):
        with pytest.raises(ValueError, match=message):
            pisa_fwd(q, k, v, key_mean, value_mean, None, layout.perm, layout.offsets, bad, 4, 0.5, "rust")
    with pytest.raises(ValueError, match="perm"):
        pisa_fwd(q, k, v, key_mean, value_mean, None, torch.zeros(20, dtype=torch.int64), layout.offsets,
                          good, 4, 0.5, "rust")


def test_kernels_write_every_output():
    """Outputs poisoned with NaN come back finite: every row of every output is written."""
    grid = difattn.TokenGrid(7, 9, text_tokens=5)
    q, k, v = random_qkv(2, 2, grid.num_tokens, 24, Dv=20, dtype=torch.float16, seed=8, token_major=True)
    layout = pisa_layout(grid, grid.num_tokens, 8, "cpu")
    B, H, N, D = q.shape
    M, Dv = layout.num_blocks, 20
    stats = [nan_poisoned(shape, dtype=torch.float32) for shape in ((B, H, M, D), (B, H, M, Dv), (B, H, D, Dv),
                                                                    (B, H, M, D), (B, H, M), (B, H, M))]
    core().pisa_stats(tensor_desc(k), tensor_desc(v), tensor_desc(q), (tensor_desc(layout.perm), tensor_desc(layout.offsets)),
                      *(tensor_desc(x) for x in stats[:5]), (tensor_desc(stats[5]), 1.5), 2)
    for name, x in zip(("key_mean", "value_mean", "moment_mean", "query_mean", "key_variance", "spread"), stats):
        assert_finite(name, x)
    key_mean, value_mean, moment_mean = stats[:3]
    blocks = route(stats[3], key_mean, 0.2, 3, sink="first")
    out, lse, zeta = (nan_poisoned((B, H, N, Dv), dtype=q.dtype), nan_poisoned((B, H, N), dtype=torch.float32),
                      nan_poisoned((B, H, N), dtype=torch.float32))
    plan = rust_launch._plan(layout.perm, layout.offsets, blocks)
    core().pisa_forward(tensor_desc(q), tensor_desc(k), tensor_desc(v), (tensor_desc(key_mean), tensor_desc(value_mean)), tensor_desc(moment_mean),
                        tensor_desc(out), tensor_desc(lse), tensor_desc(zeta), tuple(map(tensor_desc, plan)), 0.2, 2)
    for name, x in (("out", out), ("lse", lse), ("zeta", zeta)):
        assert_finite(name, x)
    dout = torch.randn(out.shape).to(q.dtype)
    grads = [nan_poisoned(x.shape, dtype=q.dtype) for x in (q, k, v)]
    stat_grads = [nan_poisoned(x.shape, dtype=torch.float32) for x in (key_mean, value_mean, moment_mean)]
    core().pisa_backward(tensor_desc(q), tensor_desc(k), tensor_desc(v), (tensor_desc(key_mean), tensor_desc(value_mean)), tensor_desc(moment_mean),
                         (tensor_desc(out), tensor_desc(dout), tensor_desc(lse), tensor_desc(zeta)), tuple(tensor_desc(g) for g in grads),
                         tuple(tensor_desc(g) for g in stat_grads[:2]), tensor_desc(stat_grads[2]), tuple(map(tensor_desc, plan)), 0.2, 2)
    for name, x in zip(("dq", "dk", "dv", "dkey_mean", "dvalue_mean", "dmoment_mean"), grads + stat_grads):
        assert_finite(name, x)


@pytest.mark.parametrize("hybrid", [False, True])
def test_opcheck_pisa_cpu(hybrid):
    grid = difattn.TokenGrid(5, 6, text_tokens=3)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, seed=10)
    layout = pisa_layout(grid, grid.num_tokens, 4, "cpu")
    key_mean, value_mean, moment_mean, query_mean, _ = block_stats(q, k, v, layout, moments=True, bias=None,
                                                                   backend="rust")
    blocks = route(query_mean, key_mean, 0.25, 2, sink=None)
    args = [x.detach().requires_grad_() for x in (q, k, v, key_mean, value_mean, moment_mean)]
    if not hybrid:
        args[5] = None
    torch.library.opcheck(pisa_fwd, (*args, layout.perm, layout.offsets, blocks, layout.max_block, 0.25, "rust"))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(pisa_stats, (*leaves, layout.perm, layout.offsets, layout.block_of, layout.slots,
                                       layout.max_block, True, "centered" if hybrid else "", "rust"))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_with_gradients():
    """The whole path (layout, statistics, routing, kernel, backward) traces into one graph (dynamic shapes: tier 2)."""
    import torch._dynamo

    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(q, k, v, grid):
        return difattn.pisa_attention(q, k, v, grid=grid, block_size=8, density=0.25, routing_bias=True)

    grid = difattn.TokenGrid(10, 12, text_tokens=5)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 16, seed=12, requires_grad=True)
    out = run(q, k, v, grid)
    expected = difattn.pisa_attention(q, k, v, grid=grid, block_size=8, density=0.25, routing_bias=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
