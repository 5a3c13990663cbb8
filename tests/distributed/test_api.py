"""``shard``/``gather`` round trips, plain sequences without a grid, a DeviceMesh as the group, the all-gathered K/V
baseline, and the errors every rank raises alike (before any collective, so nothing hangs)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import difattn
import difattn.distributed as dd
from difattn.distributed._comm import Comm
from difattn.distributed._kv_gather import dense_kv_gather
from difattn.distributed._shard import layout_of
from difattn.testing import assert_close, random_qkv

GRID = difattn.TokenGrid(5, 3, frames=2, text_tokens=3, text_position="last")


def _exact(label, got, want):
    assert_close(label, got, want, want)


def _round_trips(rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n = GRID.num_tokens
    for shape, dim in (((2, 3, n, 4), -2), ((2, n, 6), 1), ((2, 3, n), -1)):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        local = dd.shard(x, GRID, dim=dim)
        assert local.shape[dim] == layout_of(GRID, world).count(rank)
        assert torch.equal(dd.gather(local, GRID, dim=dim), x)
    x = torch.randn(2, 3, 11, 4, generator=gen, dtype=torch.float64)  # no grid: balanced runs of the sequence
    assert torch.equal(dd.gather(dd.shard(x, None), None), x)
    # gather's backward: this rank's part of the gradient (what follows is replicated)
    local = dd.shard(x, None).requires_grad_(True)
    dd.gather(local, None).backward(x)
    assert torch.equal(local.grad, dd.shard(x, None))


def _without_grid(rank: int, world: int) -> None:
    """PISA, LLSA (Ulysses) and linear attention (state) on a plain sequence, no grid: the ranks agree on N."""
    q, k, v = random_qkv(1, 2, 13, 8, dtype=torch.float64, seed=1)
    full = {
        "pisa": difattn.pisa_attention(q, k, v, density=0.5, block_size=4),
        "llsa": difattn.llsa_attention(q, k, v, block_size=4, topk=2, levels=1),
        "linear": difattn.linear_attention(q.abs(), k.abs(), v),
    }
    options = {"pisa": {"density": 0.5, "block_size": 4}, "llsa": {"block_size": 4, "topk": 2, "levels": 1},
               "linear": {}}
    for method, want in full.items():
        qq, kk = (q.abs(), k.abs()) if method == "linear" else (q, k)
        got = dd.attention(method, *(dd.shard(t, None) for t in (qq, kk, v)), **options[method])
        _exact(f"{method} without a grid", got, dd.shard(want, None))


def _mesh_and_baseline(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    q, k, v = random_qkv(2, 4, GRID.num_tokens, 8, dtype=torch.float64, seed=2)
    want = dd.shard(difattn.clear_attention(q, k, v, GRID, radius=2.0), GRID)
    got = dd.attention("clear", *(dd.shard(t, GRID, process_group=mesh) for t in (q, k, v)), GRID,
                       process_group=mesh, radius=2.0)
    _exact("clear on a DeviceMesh", got, want)
    one = [t[:, :1] for t in (q, k, v)]  # fewer heads than ranks: "auto" keeps the heads (halo), Ulysses cannot
    got = dd.attention("clear", *(dd.shard(t, GRID) for t in one), GRID, radius=5.0)
    _exact("clear with one head", got, dd.shard(difattn.clear_attention(*one, GRID, radius=5.0), GRID))
    comm = Comm()
    got = dense_kv_gather(comm, layout_of(GRID, world), *(dd.shard(t, GRID) for t in (q, k, v)), None)
    _exact("dense with all-gathered K/V", got, dd.shard(F.scaled_dot_product_attention(q, k, v), GRID))


def _raises(error, match, fn, *args, **kwargs):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def _errors(rank: int, world: int) -> None:
    q, k, v = (dd.shard(t, GRID) for t in random_qkv(1, 2, GRID.num_tokens, 8, dtype=torch.float64))
    one_head = tuple(t[:, :1] for t in (q, k, v))
    _raises(ValueError, "2 ranks", dd.attention, "dense", *one_head, GRID, scheme="ulysses")
    _raises(TypeError, "radius", dd.attention, "clear", q, k, v, GRID)
    _raises(ValueError, "radius", dd.attention, "clear", q, k, v, GRID, radius=-1.0)
    _raises(ValueError, "criss_cross", dd.attention, "grat", q, k, v, GRID, scheme="halo", pattern="criss_cross")
    _raises(ValueError, "scheme 'state'", dd.attention, "clear", q, k, v, GRID, scheme="state", radius=2.0)
    _raises(ValueError, "scheme must be", dd.attention, "clear", q, k, v, GRID, scheme="ring", radius=2.0)
    _raises(ValueError, "method must be", dd.attention, "flash", q, k, v, GRID)
    _raises(TypeError, "return_blocks", dd.attention, "pisa", q, k, v, GRID, return_blocks=True)
    _raises(TypeError, "gamma_k", dd.attention, "dydila", q, k, v, GRID, q_aux=q, k_aux=k)
    _raises(ValueError, "this rank's shard", dd.attention, "clear", q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], GRID,
            radius=2.0)
    _raises(ValueError, "fewer than the 2 ranks", dd.shard, torch.zeros(1, 4, 2), difattn.TokenGrid(1, 4))
    _raises(TypeError, "process_group", dd.shard, torch.zeros(1, 4, 2), None, process_group="world")
    dist.barrier()


def test_shard_gather_round_trip(ranks):
    ranks(2).run(_round_trips)


def test_plain_sequences_without_grid(ranks):
    ranks(2).run(_without_grid)


def test_device_mesh_group_and_all_gathered_kv_baseline(ranks):
    ranks(2).run(_mesh_and_baseline)


def test_bad_arguments_raise_on_every_rank(ranks):
    ranks(2).run(_errors)


def _counts(rank: int, world: int) -> None:
    """The bytes counted on real collectives equal those of the meta-tensor dry run the bench extrapolates with,
    and Ulysses moves what its formula says: (P-1)/P of q, k, v and of the output."""
    from difattn.bench.distributed import _call, _inputs, cases
    from difattn.distributed import _traffic
    from difattn.distributed._comm import DryComm
    from difattn.distributed._layout import Layout

    grid = difattn.TokenGrid(8, 6, text_tokens=4)
    layout, comm = Layout.stripes(grid, world), Comm()
    for case in cases(radius=2.0):
        if case.method in ("pisa", "llsa", "grat"):  # GRAT's 8x8 groups exceed this grid; its halo is CLEAR's code
            continue
        shape = (1, 4, grid.num_tokens, 8)
        x = {n: t.index_select(2, layout.indices(rank)) if isinstance(t, torch.Tensor) else t
             for n, t in _inputs(case, shape, torch.float32, "cpu", 0).items()}
        with _traffic.counting() as real:
            _call(case, comm, layout, x)
        meta = _inputs(case, (1, 4, layout.count(rank), 8), torch.float32, "meta", 0)
        with _traffic.counting() as dry:
            _call(case, DryComm(rank, world), layout, meta)
        assert (real.sent, real.received, real.calls) == (dry.sent, dry.received, dry.calls), case
        if case.method == "dense" and case.scheme == "ulysses":
            assert real.sent == 4 * 4 * 8 * 4 * layout.count(rank) * (world - 1) // world


def test_counted_bytes_match_dry_run_and_formula(ranks):
    ranks(2).run(_counts)


def _contiguous_runs(rank: int, world: int) -> None:
    """diffusers' split of a video (contiguous runs of the raster sequence, not stripes) runs exactly by Ulysses;
    the halo refuses it."""
    from difattn.distributed._attention import run
    from difattn.distributed._layout import Layout

    grid = difattn.TokenGrid(3, 4, frames=3)
    layout = Layout.chunks(grid, world)
    q, k, v = random_qkv(1, 2, grid.num_tokens, 8, dtype=torch.float64, seed=4)
    want = difattn.clear_attention(q, k, v, grid, radius=2.0, temporal_radius=2.0)
    index = layout.indices(rank)
    local = [t.index_select(2, index) for t in (q, k, v)]
    options = {"radius": 2.0, "temporal_radius": 2.0}
    _exact("clear on diffusers' video runs", run("clear", Comm(), layout, *local, "auto", options),
           want.index_select(2, index))
    _raises(ValueError, "stripes", run, "clear", Comm(), layout, *local, "halo", options)


def test_contiguous_runs_of_a_video_by_ulysses(ranks):
    ranks(2).run(_contiguous_runs)
