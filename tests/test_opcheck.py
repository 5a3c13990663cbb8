"""``torch.library.opcheck`` on every custom op of the ``difattn`` namespace, on CPU (the CUDA twins run in the
gpu tier). A new op without a case here fails :func:`test_every_op_has_a_case`."""

import contextlib
import functools
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import difattn
import difattn.ops.block.op as block_op
import difattn.ops.clear.disc_op as disc_op
import difattn.ops.linear.op as linear_op
import difattn.ops.llsa.op as llsa_op
import difattn.ops.pisa.layout as pisa_layout_op
import difattn.ops.pisa.op as pisa_op
import difattn.ops.pisa.stats as pisa_stats_op
from difattn.ops.block.plan import BlockShape, clear_plan_key, grat_plan_key
from difattn.ops.llsa import plan as llsa_plan
from difattn.ops.pisa.layout import pisa_layout
from difattn.testing import random_qkv

GRID = difattn.TokenGrid(5, 6, text_tokens=3)
SMALL_BLOCKS = BlockShape((2, 4), (4, 2))


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _block():
    key = grat_plan_key(GRID, (1, 2, 3), "neighbors", 1, True, SMALL_BLOCKS)
    valid = torch.tensor([[True, False, True] + [True] * GRID.image_tokens])
    q, k, v = random_qkv(1, 2, GRID.num_tokens, 16, seed=1)
    out, lse = block_op.block_attention_fwd(q, k, v, valid, *key.op_args(), 0.25, "rust")
    disc = clear_plan_key(GRID, 2.0, 1.0, 0, SMALL_BLOCKS)
    return {
        "block_attention_fwd": [(block_op.block_attention_fwd, (*_leaves(q, k, v), valid, *key.op_args(), 0.25, "rust")),
                                (block_op.block_attention_fwd, (*_leaves(q, k, v), None, *disc.op_args(), 0.25, "rust"))],
        "block_attention_bwd": [(block_op.block_attention_bwd,
                                 (q, k, v, out, torch.randn_like(out), lse, valid, *key.op_args(), 0.25, "rust"))],
    }


def _clear():
    q, k, v = random_qkv(1, 2, GRID.num_tokens, 16, seed=2)
    kg, vg, _ = random_qkv(1, 2, 2, 16, seed=3)
    options = (*GRID.core_args(), 2.0, 1.0, 0.25)
    out, lse = disc_op.clear_disc_fwd(q, k, v, kg, vg, *options)
    return {
        "clear_disc_fwd": [(disc_op.clear_disc_fwd, (*_leaves(q, k, v, kg, vg), *options)),
                           (disc_op.clear_disc_fwd, (*_leaves(q, k, v), None, None, *options))],
        "clear_disc_bwd": [(disc_op.clear_disc_bwd, (q, k, v, kg, vg, out, torch.randn_like(out), lse, *options))],
    }


def _pisa():
    q, k, v = random_qkv(1, 2, GRID.num_tokens, 16, seed=4)
    layout = pisa_layout(GRID, GRID.num_tokens, 4, "cpu")
    key_mean, value_mean, moment_mean, query_mean, _ = pisa_stats_op.block_stats(q, k, v, layout, moments=True,
                                                                               bias=None, backend="rust")
    blocks = pisa_stats_op.route(query_mean, key_mean, 0.25, 2, sink=None)
    plan = (layout.perm, layout.offsets, blocks, layout.max_block, 0.25, "rust")
    out, lse, zeta = pisa_op.pisa_fwd(q, k, v, key_mean, value_mean, moment_mean, *plan)
    stats_args = (layout.perm, layout.offsets, layout.block_of, layout.slots, layout.max_block)
    return {
        "pisa_fwd": [(pisa_op.pisa_fwd, (*_leaves(q, k, v, key_mean, value_mean, moment_mean), *plan)),
                     (pisa_op.pisa_fwd, (*_leaves(q, k, v, key_mean, value_mean), None, *plan))],
        "pisa_bwd": [(pisa_op.pisa_bwd, (q, k, v, key_mean, value_mean, moment_mean, out, torch.randn_like(out), lse,
                                         zeta, layout.perm, layout.offsets, blocks, layout.max_block, 0.25, "rust"))],
        "pisa_stats": [(pisa_stats_op.pisa_stats, (*_leaves(q, k, v), *stats_args, moments, bias, "rust"))
                       for moments, bias in ((True, "centered"), (False, "uncentered"), (False, "key_variance"),
                                             (False, ""))],
        "pisa_stats_bwd": [(pisa_stats_op.pisa_stats_bwd, (k, v, layout.perm, layout.offsets, key_mean, value_mean,
                                                           *grads))
                           for grads in ((torch.randn_like(key_mean), torch.randn_like(value_mean),
                                          torch.randn_like(moment_mean)), (None, torch.randn_like(value_mean), None))],
        "pisa_grid_layout": [(pisa_layout_op.pisa_grid_layout, ([1, 5, 6, 3, 0], 4, torch.device("cpu")))],
        "pisa_top_blocks": [(pisa_stats_op.pisa_top_blocks, (query_mean @ key_mean.transpose(-1, -2), 2))],
    }


def _llsa():
    q, k, v = random_qkv(1, 2, GRID.num_tokens, 16, seed=5)
    layout = llsa_plan.Layout(GRID.num_tokens, 4, (3, 2))
    queries, keys = (llsa_plan.pyramid(x, 4, 2, True) for x in (q, k))
    indices = llsa_plan.select(queries, keys, layout)
    fine, pooled = llsa_plan.block_lists(indices, layout)
    offsets, bias = llsa_plan.pooled_blocks(layout, "cpu")
    kp, vp = llsa_plan.pooled(keys, k.dtype), llsa_plan.pooled(llsa_plan.pyramid(v, 4, 2, True), v.dtype)
    plan = [fine, pooled, offsets, bias]
    out, lse = llsa_op.llsa_fwd(q, k, v, kp, vp, plan, 4, [3, 2], True, 0.25, "rust")
    perm, _ = llsa_op.llsa_zorder(*GRID.core_args(), torch.device("cpu"))
    return {
        "llsa_fwd": [(llsa_op.llsa_fwd, (*_leaves(q, k, v), kp, vp, plan, 4, [3, 2], children, 0.25, "rust"))
                     for children in (True, False)],
        "llsa_bwd": [(llsa_op.llsa_bwd, (q, k, v, kp, vp, out, torch.randn_like(out), lse, plan, 4, [3, 2], children,
                                         0.25, "rust")) for children in (True, False)],
        "llsa_zorder": [(llsa_op.llsa_zorder, (*GRID.core_args(), torch.device("cpu")))],
        "llsa_select_cpu": [(llsa_op.llsa_select_cpu, ([x.float() for x in queries], [x.float() for x in keys], 4,
                                                       [3, 2]))],
        "llsa_zorder_pool": [(llsa_op.llsa_zorder_pool, (k, perm, 4, 2, children)) for children in (True, False)],
    }


def _linear():
    q, k, v = random_qkv(1, 2, 9, 16, seed=6)
    q, k = q.relu() + 0.1, k.relu() + 0.1
    out, state, ksum = linear_op.linear_attention_fwd(q, k, v, True, 1e-6, "rust")
    q_aux, k_aux, _ = random_qkv(1, 2, 9, 16, seed=7)
    gen = torch.Generator().manual_seed(8)
    params = [1.0 + 2.0 * torch.rand(1, 2, 9, generator=gen) for _ in range(4)] + \
             [0.3 * torch.rand(1, 2, 9, generator=gen) for _ in range(2)]
    d_out, d_state, d_ksum = linear_op.dydila_fwd(q, k, v, q_aux, k_aux, *params, False, 1e-6, "rust")
    # Cross-attention: the key side (k, v, k_aux and its parameters) holds 13 tokens, the query side 9.
    _, k_x, v_x = random_qkv(1, 2, 13, 16, seed=9)
    k_x, k_aux_x = k_x.relu() + 0.1, random_qkv(1, 2, 13, 16, seed=10)[1]
    params_x = [p if i % 2 == 0 else 1.0 + torch.rand(1, 2, 13, generator=gen) for i, p in enumerate(params)]
    cross = (q, k_x, v_x, q_aux, k_aux_x, *params_x)
    x_out, x_state, x_ksum = linear_op.dydila_fwd(*cross, True, 1e-6, "rust")
    return {
        "linear_attention_fwd": [(linear_op.linear_attention_fwd, (*_leaves(q, k, v), True, 1e-6, "rust")),
                                 (linear_op.linear_attention_fwd, (*_leaves(q, k, v), False, 1e-6, "rust"))],
        "linear_attention_bwd": [(linear_op.linear_attention_bwd,
                                  (q, k, v, state, ksum, torch.randn_like(out), True, 1e-6, "rust"))],
        "dydila_fwd": [(linear_op.dydila_fwd, (*_leaves(q, k, v, q_aux, k_aux, *params), False, 1e-6, "rust")),
                       (linear_op.dydila_fwd, (*_leaves(*cross), True, 1e-6, "rust"))],
        "dydila_bwd": [(linear_op.dydila_bwd, (q, k, v, q_aux, k_aux, *params, d_state, d_ksum,
                                               torch.randn_like(d_out), False, 1e-6, "rust")),
                       (linear_op.dydila_bwd, (*cross, x_state, x_ksum, torch.randn_like(x_out), True, 1e-6, "rust"))],
    }




def _diffusers() -> dict:
    """The ops of a difattn layer under torch.compile (registered by difattn.diffusers, which needs diffusers), each
    built when its test runs (:func:`_diffusers_cases`)."""
    if importlib.util.find_spec("diffusers") is None:
        return {}
    importlib.import_module("difattn.diffusers._compiled")  # registers the ops
    names = ("diffusers_attention", "diffusers_attention_backward", "diffusers_step")
    return {name: functools.partial(_diffusers_cases, name) for name in names}


@contextlib.contextmanager
def _diffusers_cases(name: str):
    """The cases of op ``name`` on a tiny FLUX's first layer with CLEAR and its global-token weights, on a 4x4
    latent after 7 text tokens; the model stays applied while they run (the ops find their layer through a weak
    key) and is removed after, so no apply() session outlives the test (diffusers' active backend follows them)."""
    from diffusers_tiny import flux

    import difattn.diffusers as dd
    from difattn.diffusers import _compiled
    from difattn.diffusers._families import Geometry

    model, _ = flux()
    dd.apply(model, "clear", radius=2.0, down_factor=2, dense_steps=1)
    try:
        processor = model.transformer_blocks[0].attn.processor
        geometry = _compiled._pack(Geometry(1, 4, 4, 7, "first"))
        q, k, v = random_qkv(2, 2, 7 + 16, 16, seed=9)
        weight, step = processor.spatial_weight.detach(), torch.tensor(1)
        args = (geometry, processor.key, 0.25)
        yield {
            "diffusers_attention": [(_compiled._attention, (*_leaves(q, k, v), None, _leaves(weight)[0], None, step,
                                                            *args)),
                                    (_compiled._attention, (*_leaves(q, k, v), None, None, None, None, *args))],
            "diffusers_attention_backward": [(_compiled._attention_backward,
                                              (torch.randn_like(q), q, k, v, None, weight, None, step, *args))],
            "diffusers_step": [(_compiled._step, (torch.tensor([0.5, 0.5]), processor.session.key))],
        }[name]
    finally:
        dd.remove(model)


def _cases() -> dict:
    return {**_block(), **_clear(), **_pisa(), **_llsa(), **_linear(), **_diffusers()}


CASES = _cases()


def test_every_op_has_a_case():
    # Every module of difattn.ops imported (the Triton launchers register no op), so every op is registered.
    for module in pkgutil.walk_packages(difattn.ops.__path__, "difattn.ops."):
        if not module.name.endswith("triton_launch"):
            importlib.import_module(module.name)
    ops = {name for name in dir(torch.ops.difattn) if not name.startswith("_") and name != "name"}
    assert ops == set(CASES), f"ops without an opcheck case: {ops - set(CASES)}; stale cases: {set(CASES) - ops}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    cases = CASES[name]
    with cases() if callable(cases) else contextlib.nullcontext(cases) as built:
        for op, args in built:
            torch.library.opcheck(op, args)
