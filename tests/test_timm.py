"""difattn.nn.Attention in place of timm's Attention: real timm ViTs built from their registered configs (no
download), every block's ``attn`` swapped with the pretrained-style weights loaded strictly; the CLS and register
tokens are the grid's text tokens."""

import pytest
import torch

from difattn import TokenGrid, reference
from difattn.nn import Attention

timm = pytest.importorskip("timm", reason="the timm tests need timm (the 'test' extra)")

EXACT = {"clear": {"radius": 100.0}, "grat": {"group": (64, 64)}, "pisa": {"density": 1.0, "block_size": 4}}
SPARSE = {
    "clear": {"radius": 1.5},
    "grat": {"group": (2, 2)},
    "pisa": {"density": 0.25, "block_size": 4},
    "llsa": {"block_size": 4, "topk": 2},
}
MODELS = {  # name: (timm config, img_size giving a 6 x 6 patch grid, config overrides)
    "vit": ("vit_tiny_patch16_224", 96, {}),  # one class token
    # a class token and four registers; layer scales at 1 instead of their 1e-5 init, as after training
    "vit_reg": ("vit_small_patch14_reg4_dinov2", 84, {"init_values": 1.0}),
}


def _vit(name: str) -> torch.nn.Module:
    """The registered config with three blocks (fewer than the real depth, to keep the test fast)."""
    config, size, overrides = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(config, pretrained=False, img_size=size, depth=3, **overrides).eval()


def _images(name: str, batch: int = 2) -> torch.Tensor:
    size = MODELS[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _swap(model: torch.nn.Module, method: str, **options) -> torch.nn.Module:
    """Replace every block's timm Attention by difattn's, loading its weights with strict names."""
    for block in model.blocks:
        stock = block.attn
        attn = Attention(
            stock.qkv.in_features, stock.num_heads, method=method, qkv_bias=stock.qkv.bias is not None,
            num_prefix_tokens=model.num_prefix_tokens, **options,
        )
        attn.load_state_dict(stock.state_dict())
        block.attn = attn.to(stock.qkv.weight.dtype)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(EXACT))
def test_exact_settings_equal_stock_timm_float64(name, method):
    model = _vit(name).double()
    x = _images(name).double()
    with torch.no_grad():
        stock = model.forward_features(x)
        out = _swap(model, method, backend="torch", **EXACT[method]).forward_features(x)
    torch.testing.assert_close(out, stock, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_and_fast_backend_equal_stock_timm_float32(name):
    model = _vit(name)
    x = _images(name)
    with torch.no_grad():
        stock = model.forward_features(x)
        dense = _swap(_vit(name), "dense").forward_features(x)
        torch.testing.assert_close(dense, stock, atol=1e-5, rtol=1e-4)
        clear = _swap(model, "clear", **EXACT["clear"]).forward_features(x)
        torch.testing.assert_close(clear, stock, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(SPARSE))
def test_sparse_methods_run_in_a_timm_vit(method):
    model = _vit("vit_reg")
    x = _images("vit_reg")
    with torch.no_grad():
        stock = model.forward_features(x)
        out = _swap(model, method, **SPARSE[method]).forward_features(x)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert (out - stock).abs().max() > 1e-2


def test_prefix_tokens_are_text_tokens_of_the_grid():
    """num_prefix_tokens=2 on a 4 x 6 grid: CLEAR of the module is CLEAR on TokenGrid(4, 6, text_tokens=2) —
    the prefix tokens see every token and every token sees them."""
    torch.manual_seed(0)
    module = Attention(32, 4, method="clear", radius=1.5, num_prefix_tokens=2)
    x = torch.randn(2, 2 + 24, 32, generator=torch.Generator().manual_seed(2))
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    out = reference.clear_attention(q, k, v, TokenGrid(4, 6, text_tokens=2), radius=1.5)
    expected = module.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(module(x, grid=TokenGrid(4, 6)), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(module(x, grid=TokenGrid(4, 6, text_tokens=2)), expected, atol=2e-6, rtol=1e-5)
    square = torch.randn(1, 2 + 25, 32)
    torch.testing.assert_close(module(square), module(square, grid=TokenGrid(5, 5)))  # inferred after the prefix


def test_timm_call_and_defaults():
    """timm's Attention signature: qkv_bias off by default, attn_mask/is_causal accepted by the dense method (and
    equal to timm's), refused by the others; a grid passed in timm's attn_mask slot says how to pass it."""
    stock = timm.layers.Attention(32, num_heads=4)
    module = Attention(32, 4)
    assert stock.qkv.bias is None and module.qkv.bias is None
    module.load_state_dict(stock.state_dict())
    x = torch.randn(2, 9, 32)
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(module(x, attn_mask=mask), stock(x, attn_mask=mask), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(module(x, is_causal=True), stock(x, is_causal=True), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        Attention(32, 4, method="grat", group=(2, 2))(x, mask)
    with pytest.raises(TypeError, match="grid="):
        module(x, TokenGrid(3, 3))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        Attention(32, 4, num_prefix_tokens=-1)
