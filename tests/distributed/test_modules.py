"""``nn.Attention(process_group=...)`` and ``models.DiT(process_group=...)`` on 3 gloo processes equal the same
module on one process: outputs, input gradients, and parameter gradients summed over the ranks (float64)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import difattn
import difattn.distributed as dd
from difattn.models import DiT
from difattn.testing import assert_close


GRIDS = (
    difattn.TokenGrid(7, 6, text_tokens=5),  # rows 3, 2, 2 on three ranks
    difattn.TokenGrid(5, 4, frames=2, text_tokens=4, text_position="last"),  # rows 2, 2, 1; frames convolved apart
)
MODULES = {
    "dense": {},
    "clear": {"radius": 2.5},
    "clear+global": {"radius": 1.5, "down_factor": 3},  # 3x3 windows cut by the stripes (rows 3, 2, 2)
    "grat": {"group": (2, 2)},
    "pisa": {"density": 0.5, "block_size": 4},
    "llsa": {"block_size": 4, "topk": 2, "levels": 1},
    "linear": {"dwconv_kernel": 5},  # the 5x5 conv needs a 2-row halo; rank 1's 2-row stripe is thinner than both
    "dydila": {"dwconv_kernel": 3, "num_projectors": 2, "num_kernels": 3, "num_lambdas": 3},
}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (DiT starts from adaLN-Zero, an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _same(label: str, sharded: torch.Tensor, reference: torch.Tensor) -> None:
    assert_close(label, sharded, reference, reference)


def _check_grads(label: str, sharded: torch.nn.Module, single: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(sharded.named_parameters(), single.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{label}: {name} has a gradient only when sharded"
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each rank holds its share
        _same(f"{label} grad of {name}", grad, q.grad)


def _attention_layers(rank: int, world: int) -> None:
    for grid in GRIDS:
        for label, options in MODULES.items():
            _attention_layer(grid, label, options)


def _attention_layer(grid: difattn.TokenGrid, label: str, options: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, grid.num_tokens, 32, generator=gen, dtype=torch.float64)
    dout = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    method = label.split("+")[0]
    single = difattn.nn.Attention(32, 4, method=method, qk_norm=True, **options).double()
    _randomise(single, 1)
    sharded = difattn.nn.Attention(32, 4, method=method, qk_norm=True, process_group=dist.group.WORLD, **options)
    sharded.double().load_state_dict(single.state_dict())
    xs, xl = x.clone().requires_grad_(True), dd.shard(x, grid).requires_grad_(True)
    out = single(xs, grid=grid)
    out.backward(dout)
    out_local = sharded(xl, grid=grid)
    out_local.backward(dd.shard(dout, grid))
    _same(f"Attention({label}) on {grid} output", out_local, dd.shard(out, grid))
    _same(f"Attention({label}) on {grid} grad of x", xl.grad, dd.shard(xs.grad, grid))
    _check_grads(f"Attention({label}) on {grid}", sharded, single)


def _dit(rank: int, world: int) -> None:
    for method, options, pos_embed in (("clear", {"radius": 2.0}, "sincos"), ("dense", {}, "rope")):
        kwargs = dict(input_size=(14, 10), patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
                      num_classes=5, attention=method, attention_options=options, pos_embed=pos_embed)
        single = DiT(**kwargs).double().eval()
        _randomise(single, 2)
        sharded = DiT(**kwargs, process_group=dist.group.WORLD).double().eval()
        sharded.load_state_dict(single.state_dict())
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 14, 10, generator=gen, dtype=torch.float64)
        t, y = torch.tensor([3.0, 700.0], dtype=torch.float64), torch.tensor([1, 4])
        dout = torch.randn(2, 6, 14, 10, generator=gen, dtype=torch.float64)
        out = single(x, t, y)
        out.backward(dout)
        out_sharded = sharded(x, t, y)  # same inputs and output on every rank
        out_sharded.backward(dout)
        _same(f"DiT({method}, {pos_embed}) output", out_sharded, out)
        _check_grads(f"DiT({method}, {pos_embed})", sharded, single)
    ema = copy.deepcopy(sharded)  # what EMA training does; a ProcessGroup cannot be copied, so it is shared
    assert ema.process_group is sharded.process_group
    with torch.no_grad():
        _same("deep copy of a sharded DiT", ema(x, t, y), sharded(x, t, y))


def _modules(rank: int, world: int) -> None:
    _attention_layers(rank, world)
    _dit(rank, world)


def test_sharded_attention_layers_and_dit_equal_one_process(ranks):
    ranks(3).run(_modules, timeout=150)
