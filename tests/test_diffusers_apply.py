"""difattn.diffusers.apply options: dense layers and steps, routes, text padding, CLEAR checkpoints, errors."""

import logging

import pytest
import torch

import difattn.diffusers as dd
from difattn import TokenGrid, reference
from difattn.diffusers import _dispatcher
from diffusers_tiny import flux, hunyuan_video, layer_call, qwen_image, run, sana, sd3, wan

SPARSE_CLEAR = {"radius": 1.5}


@pytest.fixture(scope="module")
def flux_model():
    return flux()


def _applied(model, kwargs, *args, **options):
    dd.apply(model, *args, **options)
    try:
        return run(model, kwargs)
    finally:
        dd.remove(model)


def test_attention_layers_in_execution_order(flux_model):
    model, _ = flux_model
    assert dd.attention_layers(model) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert dd.attention_layers(sd3()[0]) == [
        "transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
    ]


def test_dense_layers_keep_chosen_layers_stock(flux_model):
    model, make = flux_model
    kwargs = make(6, 5)
    stock = run(model, kwargs)
    assert torch.equal(_applied(model, kwargs, "clear", dense_layers=[0, 1], **SPARSE_CLEAR), stock)
    by_name = _applied(model, kwargs, "clear", dense_layers=["single_transformer_blocks.0.attn"], **SPARSE_CLEAR)
    by_index = _applied(model, kwargs, "clear", dense_layers=[-1], **SPARSE_CLEAR)
    assert torch.equal(by_name, by_index)
    assert not torch.equal(by_name, stock)
    assert not torch.equal(by_name, _applied(model, kwargs, "clear", **SPARSE_CLEAR))


def test_dense_steps_count_timesteps(flux_model):
    """Steps advance when the timestep falls, repeat for an equal one (CFG), restart when it rises."""
    model, make = flux_model
    timesteps = [1.0, 1.0, 0.75, 0.5, 0.25, 1.0]
    stock = [run(model, make(6, 5, timestep=t)) for t in timesteps]
    sparse = _applied(model, make(6, 5, timestep=0.5), "clear", **SPARSE_CLEAR)
    dd.apply(model, "clear", dense_steps=2, **SPARSE_CLEAR)
    try:
        outs = [run(model, make(6, 5, timestep=t)) for t in timesteps]
    finally:
        dd.remove(model)
    dense_expected = [True, True, True, False, False, True]  # steps 0, 0, 1, 2, 3, then a new generation
    for out, ref, dense in zip(outs, stock, dense_expected):
        assert torch.equal(out, ref) == dense
    assert torch.equal(outs[3], sparse)


def test_dense_method_is_the_stock_model(flux_model):
    model, make = flux_model
    kwargs = make(6, 5)
    assert torch.equal(_applied(model, kwargs, "dense"), run(model, kwargs))


def test_dispatcher_and_sdpa_routes_agree(flux_model, monkeypatch):
    """FLUX calls diffusers' dispatcher: the registered backend and SDPA interception must give the same output."""
    if _dispatcher.register() is None:
        pytest.skip("this diffusers version is outside the registry versions difattn knows")
    model, make = flux_model
    kwargs = make(6, 5)
    entered = []
    real_active = _dispatcher.active
    monkeypatch.setattr(_dispatcher, "active", lambda layer: (entered.append(layer), real_active(layer))[1])
    via_dispatcher = _applied(model, kwargs, "clear", **SPARSE_CLEAR)
    assert len(entered) == 2  # both layers went through the registered backend
    monkeypatch.setattr(_dispatcher, "register", lambda: None)
    entered.clear()
    via_sdpa = _applied(model, kwargs, "clear", **SPARSE_CLEAR)
    assert entered == []
    torch.testing.assert_close(via_sdpa, via_dispatcher, atol=1e-6, rtol=1e-5)


def test_clear_global_tokens_load_reference_checkpoint_layout(flux_model):
    """The CLEAR reference saves ``*.attn.processor.spatial_weight`` (1, 1, 1, d, 1, d, 1) next to the image-stream
    projections; such a state dict loads into a transformer with difattn's CLEAR processors."""
    model, make = flux_model
    d = 2
    dd.apply(model, "clear", radius=2.0, down_factor=d)
    try:
        checkpoint = {}
        for name in dd.attention_layers(model):
            checkpoint[f"{name}.processor.spatial_weight"] = torch.rand(1, 1, 1, d, 1, d, 1)
            for proj in ("to_q", "to_k", "to_v"):
                checkpoint[f"{name}.{proj}.weight"] = model.get_submodule(f"{name}.{proj}").weight.detach() * 1.01
        missing, unexpected = model.load_state_dict(checkpoint, strict=False)
        assert unexpected == []
        for key, value in checkpoint.items():
            assert torch.equal(model.state_dict()[key], value), key
        assert run(model, make(6, 6)).isfinite().all()
        assert run(model, make(5, 7)).isfinite().all()  # sides not multiples of d: zero-padded windows
    finally:
        dd.remove(model)
    assert not any("spatial_weight" in k for k in model.state_dict())


def test_clear_global_tokens_are_pooled_post_rope_keys(flux_model, monkeypatch):
    """One layer call against reference.clear_attention with independently pooled global keys and values."""
    model, make = flux_model
    dd.apply(model, "clear", radius=1.5, down_factor=2)
    processor = model.get_submodule("single_transformer_blocks.0.attn").processor
    with torch.no_grad():
        processor.spatial_weight.copy_(torch.rand_like(processor.spatial_weight))
    try:
        seen = layer_call(model, processor, make(4, 6, text=3), monkeypatch)
    finally:
        dd.remove(model)
    q, k, v = seen["q"], seen["k"], seen["v"]
    grid = TokenGrid(4, 6, text_tokens=3)
    w = processor.spatial_weight.detach().view(2, 2)
    image_k = k[:, :, 3:].unflatten(2, (2, 2, 3, 2))  # (B, H, rows, 2, cols, 2, D)
    image_v = v[:, :, 3:].unflatten(2, (2, 2, 3, 2))
    pool = lambda x: torch.einsum("bhrycxd,yx->bhrcd", x, w).flatten(2, 3)  # noqa: E731
    expected = reference.clear_attention(q, k, v, grid, radius=1.5, global_kv=(pool(image_k), pool(image_v)))
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "method, options",
    [("grat", {"group": (2, 2)}), ("clear", SPARSE_CLEAR), ("pisa", {"density": 0.3, "block_size": 4})],
)
def test_hunyuan_text_padding_equals_unpadded_prompt(method, options):
    """Padded text keys are invisible: a padded prompt gives the image output of the same prompt unpadded."""
    model, make = hunyuan_video()
    padded = make(4, 5, text=6, batch=1, real_text=(4,))
    unpadded = dict(padded, encoder_hidden_states=padded["encoder_hidden_states"][:, :4],
                    encoder_attention_mask=padded["encoder_attention_mask"][:, :4])
    # The stock model agrees with itself (padding is masked), and so must difattn.
    torch.testing.assert_close(run(model, padded), run(model, unpadded), atol=1e-5, rtol=1e-4)
    out_padded = _applied(model, padded, method, **options)
    out_unpadded = _applied(model, unpadded, method, **options)
    torch.testing.assert_close(out_padded, out_unpadded, atol=1e-5, rtol=1e-4)


def test_bad_arguments_are_named(flux_model):
    model, _ = flux_model
    with pytest.raises(ValueError, match="method"):
        dd.apply(model, "flash")
    with pytest.raises(TypeError, match="radius"):
        dd.apply(model, "clear")
    with pytest.raises(TypeError, match="grid"):
        dd.apply(model, "clear", radius=4, grid=TokenGrid(2, 2))
    with pytest.raises(ValueError, match="dense_layers"):
        dd.apply(model, "clear", radius=4, dense_layers=[5])
    with pytest.raises(ValueError, match="dense_layers"):
        dd.apply(model, "clear", radius=4, dense_layers=["blocks.0.attn"])
    with pytest.raises(ValueError, match="dense_steps"):
        dd.apply(model, "clear", radius=4, dense_steps=-1)
    with pytest.raises(TypeError, match="transformer"):
        dd.apply(torch.nn.Linear(2, 2), "clear", radius=4)
    assert not hasattr(model, "_difattn_session")


def test_unreadable_geometry_raises_only_where_needed(flux_model):
    model, make = flux_model
    kwargs = make(6, 5)
    kwargs["img_ids"] = kwargs["img_ids"][torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    dd.apply(model, "clear", dense_layers=[0], **SPARSE_CLEAR)
    try:
        with pytest.raises(ValueError, match="raster grid"):
            run(model, kwargs)
    finally:
        dd.remove(model)
    dd.apply(model, "clear", dense_layers=[0, 1], **SPARSE_CLEAR)  # every layer dense: the geometry is not needed
    try:
        run(model, kwargs)
    finally:
        dd.remove(model)


def test_apply_twice_replaces_the_first(flux_model):
    model, make = flux_model
    kwargs = make(6, 5)
    dd.apply(model, "clear", **SPARSE_CLEAR)
    dd.apply(model, "grat", group=(2, 2))
    try:
        twice = run(model, kwargs)
        assert len(model._forward_pre_hooks) == 1
    finally:
        dd.remove(model)
    assert torch.equal(twice, _applied(model, kwargs, "grat", group=(2, 2)))
    assert not isinstance(model.get_submodule("transformer_blocks.0.attn").processor, dd.DifattnProcessor)


def test_flux_ids_give_frames_height_width():
    from difattn.diffusers._families import _grid_from_ids

    def ids(frames, height, width, offset=(0, 0)):
        t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
        return torch.stack([t, y + offset[0], x + offset[1]], dim=-1).reshape(-1, 3).float()

    assert _grid_from_ids(ids(1, 3, 5)) == (1, 3, 5)
    assert _grid_from_ids(ids(2, 4, 3, offset=(4, 0))) == (2, 4, 3)  # Kontext: a reference image as a second frame
    assert _grid_from_ids(ids(1, 3, 5)[None].expand(2, -1, -1)) == (1, 3, 5)  # deprecated batched ids
    with pytest.raises(ValueError, match="raster"):
        _grid_from_ids(ids(1, 3, 5).flip(0))


def test_processor_exposes_the_stock_signature(flux_model):
    """diffusers drops keyword arguments a processor's __call__ does not name, so the wrapper must name them."""
    import inspect

    model, _ = flux_model
    stock = model.get_submodule("transformer_blocks.0.attn").processor
    dd.apply(model, "clear", **SPARSE_CLEAR)
    try:
        wrapped = model.get_submodule("transformer_blocks.0.attn").processor
        assert inspect.signature(wrapped.__call__) == inspect.signature(stock.__call__)
        assert wrapped.original is stock
    finally:
        dd.remove(model)


def test_apply_returns_and_logs_what_it_changed(flux_model, caplog):
    model, _ = flux_model
    with caplog.at_level(logging.INFO, logger="difattn"):
        summary = dd.apply(model, "clear", radius=4, dense_layers=[0], dense_steps=2)
        dd.remove(model)
    assert isinstance(summary, dd.ApplySummary)
    assert (summary.model, summary.family, summary.method) == ("FluxTransformer2DModel", "flux", "clear")
    assert summary.options == {"radius": 4} and summary.dense_steps == 2
    assert summary.replaced == ("single_transformer_blocks.0.attn",)
    assert summary.dense == ("transformer_blocks.0.attn",)
    assert summary.dispatcher == (_dispatcher.register() is not None)
    assert str(summary).startswith("difattn: clear(radius=4) in 1 of 2 attention layers of FluxTransformer2DModel")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("difattn")]
    assert messages[0] == str(summary) and "removed" in messages[1] and len(messages) == 2
    assert dd.apply(model, "dense").dense == tuple(dd.attention_layers(model))
    dd.remove(model)


@pytest.mark.parametrize("build", [flux, wan], ids=["flux", "wan"])
def test_dispatcher_backend_name_works_after_apply(build):
    """After apply, set_attention_backend("difattn") and attention_backend("difattn") are accepted: difattn's layers
    run the method, every other dispatcher call (Wan's cross-attention) runs SDPA; remove() undoes the choice."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

    if _dispatcher.register() is None:
        pytest.skip("this diffusers version is outside the registry versions difattn knows")
    model, make = build()
    kwargs = make(4, 6)
    stock = run(model, kwargs)
    expected = _applied(model, kwargs, "clear", **SPARSE_CLEAR)
    dd.apply(model, "clear", **SPARSE_CLEAR)
    try:
        with attention_backend("difattn"):
            torch.testing.assert_close(run(model, kwargs), expected, atol=1e-6, rtol=1e-5)
        model.set_attention_backend("difattn")
        torch.testing.assert_close(run(model, kwargs), expected, atol=1e-6, rtol=1e-5)
    finally:
        dd.remove(model)
    assert _AttentionBackendRegistry._active_backend.value == "native"
    assert not any(getattr(getattr(m, "processor", None), "_attention_backend", None) for m in model.modules())
    assert torch.equal(run(model, kwargs), stock)


def test_dispatcher_backend_without_apply_says_what_to_call():
    from diffusers.models.attention_dispatch import attention_backend

    if _dispatcher.register() is None:
        pytest.skip("this diffusers version is outside the registry versions difattn knows")
    model, make = flux()
    with attention_backend("difattn"), pytest.raises(RuntimeError, match=r"difattn\.diffusers\.apply"):
        run(model, make(4, 6))


def test_sana_has_nothing_to_replace():
    model = sana()
    processors = [type(m.processor) for m in model.modules() if hasattr(m, "processor")]
    with pytest.raises(ValueError, match="linear attention"):
        dd.apply(model, "clear", radius=4)
    assert [type(m.processor) for m in model.modules() if hasattr(m, "processor")] == processors
    assert not hasattr(model, "_difattn_session")


def test_qwen_image_edit_images_become_frames():
    """QwenImage-Edit packs the image and a same-sized reference image: two frames of one grid; references of
    another size cannot form a grid and raise (instead of running on a wrong geometry)."""
    model, make = qwen_image()
    kwargs = make(4, 3, batch=1)
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"], kwargs["hidden_states"].flip(1)], dim=1)
    kwargs["img_shapes"] = [[(1, 4, 3), (1, 4, 3)]]
    stock = run(model, kwargs)
    torch.testing.assert_close(_applied(model, kwargs, "clear", radius=100.0), stock, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="img_shapes"):
        _applied(model, dict(kwargs, img_shapes=[[(1, 4, 3), (1, 3, 4)]]), "clear", radius=1.5)
