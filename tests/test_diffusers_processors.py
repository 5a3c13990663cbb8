"""difattn.diffusers on tiny random models of the six families: exact where a method must equal dense attention,
different where it is sparse, and the stock model back after remove()."""

import pytest
import torch

import difattn.diffusers as dd
from diffusers_tiny import FAMILIES, run

EXACT = {  # settings under which the method is dense attention on these grids
    "clear": {"radius": 100.0},
    "grat": {"group": (64, 64)},
    "pisa": {"density": 1.0, "block_size": 4},
}
SPARSE = {
    "clear": {"radius": 1.5},
    "grat": {"group": (2, 2)},
    "pisa": {"density": 0.2, "block_size": 4},
    "llsa": {"block_size": 4, "topk": 2},
}


def _grid_size(family: str) -> tuple[int, int]:
    return (6, 6) if family == "dit" else (6, 5)  # diffusers' DiT unpatchifies square grids only


def _inputs(family: str, make, **kwargs):
    if family == "hunyuan_video":
        kwargs.setdefault("real_text", (4, 6))  # the first sample's text is padded
    return make(*_grid_size(family), **kwargs)


def _double(model, kwargs):
    cast = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    return model.double(), cast


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, make = FAMILIES[request.param]()
    return request.param, model, make


@pytest.mark.parametrize("method", sorted(EXACT))
def test_exact_settings_equal_stock_float64(family, method):
    name, model, make = family
    model, kwargs = _double(model, _inputs(name, make))
    try:
        stock = run(model, kwargs)
        dd.apply(model, method, backend="torch", **EXACT[method])
        out = run(model, kwargs)
    finally:
        dd.remove(model)
        model.float()
    torch.testing.assert_close(out, stock, atol=1e-10, rtol=1e-10)


def test_exact_settings_equal_stock_float32_fast_backend(family):
    name, model, make = family
    kwargs = _inputs(name, make)
    stock = run(model, kwargs)
    dd.apply(model, "clear", **EXACT["clear"])
    try:
        out = run(model, kwargs)
    finally:
        dd.remove(model)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(SPARSE))
def test_sparse_settings_run_and_differ(family, method):
    name, model, make = family
    kwargs = _inputs(name, make)
    stock = run(model, kwargs)
    dd.apply(model, method, **SPARSE[method])
    try:
        out = run(model, kwargs)
    finally:
        dd.remove(model)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert (out - stock).abs().max() > 1e-4


def test_remove_restores_stock_output_exactly(family):
    name, model, make = family
    kwargs = _inputs(name, make)
    processors = {n: type(m.processor) for n, m in _layers(model)}
    keys = set(model.state_dict())
    stock = run(model, kwargs)
    dd.apply(model, "grat", **SPARSE["grat"])
    assert all(isinstance(m.processor, dd.DifattnProcessor) for _, m in _layers(model))
    assert set(model.state_dict()) == keys  # no new weights without CLEAR's global tokens
    run(model, kwargs)
    dd.remove(model)
    assert {n: type(m.processor) for n, m in _layers(model)} == processors
    assert not model._forward_pre_hooks
    assert torch.equal(run(model, kwargs), stock)
    dd.remove(model)  # a second remove is a no-op


def test_geometry_follows_every_call(family):
    """Resolution and prompt length change between calls; the processors follow without re-applying."""
    name, model, make = family
    shapes = [(4, 4), (6, 6)] if name == "dit" else [(4, 7), (6, 5)]
    text = {} if name in ("dit",) else {"text": 3}
    calls = [make(*shapes[0], **text), make(*shapes[1])]
    stock = [run(model, kwargs) for kwargs in calls]
    dd.apply(model, "clear", **EXACT["clear"])
    try:
        outs = [run(model, kwargs) for kwargs in calls]
    finally:
        dd.remove(model)
    for out, ref in zip(outs, stock):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def _layers(model):
    return [(n, model.get_submodule(n)) for n in dd.attention_layers(model)]
