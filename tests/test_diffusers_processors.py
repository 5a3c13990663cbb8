"""difattn.diffusers on tiny random models of every supported family: exact where a method must equal dense
attention, different where it is sparse, the stock model back after remove(), and the token grid difattn reads
checked by value against where the model really puts each token."""

import inspect

import pytest
import torch

import difattn.diffusers as dd
from diffusers_tiny import FAMILIES, LAYOUTS, PADDED_TEXT, run

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
    if family in PADDED_TEXT:
        kwargs.setdefault("real_text", (4, 6))  # both samples' text is padded, by different amounts
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
    assert (out - stock).abs().max() > 1e-5  # exact settings stay within 1e-6 of stock in float32


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


def _perturbed(kwargs: dict, layout, t: int, y: int, x: int, height: int, width: int) -> dict:
    """``kwargs`` with latent token ``(t, y, x)`` changed, located by the model's input layout alone."""
    hidden = kwargs["hidden_states"].clone()
    pt, ph, pw = layout.patch
    if layout.form == "packed":
        hidden[:, (t * height + y) * width + x] += 1.0
    elif layout.form == "bchw":
        hidden[:, :, y * ph, x * pw] += 1.0
    elif layout.form == "bcfhw":
        hidden[:, :, t * pt, y * ph, x * pw] += 1.0
    else:  # "bfchw"
        hidden[:, t * pt, :, y * ph, x * pw] += 1.0
    return dict(kwargs, hidden_states=hidden)


def _first_layer_queries(model, kwargs, monkeypatch) -> list:
    """``(q, grid)`` of every difattn call of the first layer that runs, in one forward."""
    from difattn.diffusers import _processor

    calls, real = [], _processor.LayerAttention._attend

    def spy(self, q, k, v, grid, text_mask, global_kv, *, scale):
        calls.append((self.processor.index, q.detach().clone(), grid))
        return real(self, q, k, v, grid, text_mask, global_kv, scale=scale)

    with monkeypatch.context() as patch:
        patch.setattr(_processor.LayerAttention, "_attend", spy)
        run(model, kwargs)
    first = min(index for index, _, _ in calls)
    return [(q, grid) for index, q, grid in calls if index == first]


def _changed_tokens(before, after) -> set[int]:
    """Token indices whose query moved (any batch, head or channel)."""
    return set(torch.nonzero((after - before).abs().amax(dim=(0, 1, 3)) > 1e-6).flatten().tolist())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_grid_is_where_the_model_puts_each_token(name, monkeypatch):
    """By value, for every family: the grid difattn reads has the model's height, width and frames (a non-square
    grid, so a swap shows), a latent token perturbed in the model's own input moves exactly the query at that
    token's raster index in the grid, and a perturbed text token moves the grid's text side most."""
    model, make = FAMILIES[name]()
    layout = LAYOUTS[name]
    height, width = (4, 4) if name == "dit" else (5, 3)  # diffusers' DiT unpatchifies square grids only
    video = "frames" in inspect.signature(make).parameters
    frames = 2 if video else 1
    kwargs = make(height, width, batch=1, **({"frames": frames} if video else {}))
    dd.apply(model, "clear", radius=100.0, backend="torch")
    try:
        (q, grid), *_ = _first_layer_queries(model, kwargs, monkeypatch)
        assert (grid.frames, grid.height, grid.width) == (frames, height, width)
        t, y, x = frames - 1, height - 1, 1
        (q_moved, _), *_ = _first_layer_queries(model, _perturbed(kwargs, layout, t, y, x, height, width), monkeypatch)
        assert _changed_tokens(q, q_moved) == {grid.image_range.start + (t * height + y) * width + x}
        if layout.text is None:
            return
        assert grid.text_tokens and grid.text_position == layout.text  # the first layer is a joint one
        text = kwargs["encoder_hidden_states"].clone()
        text[:, 0] += 1.0
        (q_text, _), *_ = _first_layer_queries(model, dict(kwargs, encoder_hidden_states=text), monkeypatch)
        moved = (q_text - q).abs().amax(dim=(0, 1, 3))
        assert int(moved.argmax()) in grid.text_range
    finally:
        dd.remove(model)
