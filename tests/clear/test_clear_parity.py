"""CLEAR's conventions from the authors' released code: the high-resolution inference's proportional attention in
``difattn.nn.Attention`` and ``difattn.diffusers.apply``, and the public global-token pooling helper
``difattn.clear_global_kv`` (the checkpoints' ``processor.spatial_weight``), each against an independent twin of
the released formulas."""

from __future__ import annotations

import math

import pytest
import torch

import difattn
from difattn import TokenGrid, reference
from difattn.nn import Attention
from difattn.testing import random_qkv

DIM, HEADS = 32, 2
TRAIN_TOKENS = 64**2 + 512  # the released processors' train_seq_len


def released_scale(num_tokens: int, head_dim: int, global_tokens: bool, train_tokens: int = TRAIN_TOKENS) -> float:
    """The released processors: ``sqrt(log(key_len, train_seq_len) / head_dim)``, with ``10 * key_len`` in the one
    with global tokens (``LocalDownsampleFlexAttnProcessor``)."""
    return math.sqrt(math.log((10 if global_tokens else 1) * num_tokens, train_tokens) / head_dim)


def pool_windows(x: torch.Tensor, grid: TokenGrid, weight: torch.Tensor) -> torch.Tensor:
    """The released pooling: ``(x_image.unflatten(h/d, d, w/d, d) * spatial_weight).sum(3, 5)``, divisible sides."""
    d = weight.shape[3]
    image = x[:, :, grid.image_range.start : grid.image_range.stop]
    windows = image.unflatten(2, (grid.height // d, d, grid.width // d, d)) * weight
    return windows.sum(dim=(3, 5)).flatten(2, 3)


@pytest.mark.parametrize("down_factor", [None, 2])
@pytest.mark.parametrize("proportional, train_tokens", [(True, TRAIN_TOKENS), (64, 64)])
def test_module_proportional_attention_scale(down_factor, proportional, train_tokens):
    grid = TokenGrid(4, 6, text_tokens=3)
    torch.manual_seed(0)
    options = {} if down_factor is None else {"down_factor": down_factor}
    module = Attention(DIM, HEADS, method="clear", radius=1.5, qkv_bias=True, proportional_attention=proportional,
                       **options)
    x = torch.randn(2, grid.num_tokens, DIM)
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    global_kv = None
    if down_factor is not None:
        global_kv = tuple(pool_windows(t, grid, module.spatial_weight) for t in (k, v))
    scale = released_scale(N, C // HEADS, down_factor is not None, train_tokens)
    out = reference.clear_attention(q, k, v, grid, radius=1.5, global_kv=global_kv, scale=scale)
    expected = module.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(module(x, grid=grid), expected, atol=2e-6, rtol=1e-5)
    # The scale differs from head_dim**-0.5 at this N: the option is not a no-op.
    assert abs(scale - (C // HEADS) ** -0.5) > 0.02


def test_proportional_attention_is_checked():
    with pytest.raises(ValueError, match="proportional_attention"):
        Attention(DIM, HEADS, method="clear", radius=2.0, proportional_attention=1)
    with pytest.raises(TypeError, match="proportional_attention"):
        Attention(DIM, HEADS, method="clear", radius=2.0, proportional_attention=2.5)
    with pytest.raises(TypeError, match="proportional_attention"):
        Attention(DIM, HEADS, method="grat", proportional_attention=True)


@pytest.mark.parametrize("down_factor", [None, 2])
def test_apply_proportional_attention_scale(down_factor, monkeypatch):
    """One FLUX layer call: the processor runs CLEAR at the released proportional scale of the call's N."""
    import difattn.diffusers as dd
    from diffusers_tiny import flux, layer_call

    model, make = flux()
    options = {} if down_factor is None else {"down_factor": down_factor}
    dd.apply(model, "clear", radius=1.5, proportional_attention=True, **options)
    processor = model.get_submodule("single_transformer_blocks.0.attn").processor
    try:
        seen = layer_call(model, processor, make(4, 6, text=3), monkeypatch)
    finally:
        dd.remove(model)
    q, k, v = seen["q"], seen["k"], seen["v"]
    grid = TokenGrid(4, 6, text_tokens=3)
    global_kv = None
    if down_factor is not None:
        global_kv = tuple(pool_windows(t, grid, processor.spatial_weight.detach()) for t in (k, v))
    scale = released_scale(grid.num_tokens, q.shape[-1], down_factor is not None)
    expected = reference.clear_attention(q, k, v, grid, radius=1.5, global_kv=global_kv, scale=scale)
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grid", [TokenGrid(4, 6, text_tokens=3), TokenGrid(6, 4, frames=2, text_tokens=2,
                                                                                text_position="last")])
def test_public_global_kv_pools_like_the_released_processor(grid):
    q, k, v = random_qkv(2, 3, grid.num_tokens, 8, Dv=5, seed=1, requires_grad=True)
    weight = torch.rand(1, 1, 1, 2, 1, 2, 1, requires_grad=True)
    k_g, v_g = difattn.clear_global_kv(k, v, grid, weight)
    if grid.frames == 1:
        expected = tuple(pool_windows(t, grid, weight) for t in (k, v))
    else:  # each frame pooled on its own, frames outermost
        frames = [TokenGrid(grid.height, grid.width) for _ in range(grid.frames)]
        image = [t[:, :, grid.image_range.start : grid.image_range.stop] for t in (k, v)]
        plane = grid.height * grid.width
        expected = tuple(torch.cat([pool_windows(x[:, :, f * plane : (f + 1) * plane], g, weight)
                                    for f, g in enumerate(frames)], dim=2) for x in image)
    torch.testing.assert_close(k_g, expected[0])
    torch.testing.assert_close(v_g, expected[1])
    grads = torch.autograd.grad((k_g.sum() + v_g.square().sum()), (k, v, weight))
    expected_grads = torch.autograd.grad((expected[0].sum() + expected[1].square().sum()), (k, v, weight))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_public_global_kv_checks_its_arguments():
    grid = TokenGrid(4, 4)
    _, k, v = random_qkv(1, 1, 16, 4, seed=2)
    with pytest.raises(ValueError, match="spatial_weight"):
        difattn.clear_global_kv(k, v, grid, torch.ones(1, 1, 2, 2, 1, 2, 1))
    with pytest.raises(ValueError, match="spatial_weight"):
        difattn.clear_global_kv(k, v, grid, torch.ones(2, 2))
    with pytest.raises(ValueError, match="grid"):
        difattn.clear_global_kv(k, v, TokenGrid(4, 5), torch.ones(1, 1, 1, 2, 1, 2, 1))
