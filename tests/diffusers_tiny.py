"""Tiny randomly initialised diffusers transformers of the six supported families, and inputs for them.

Configs follow diffusers' own model tests (a layer or two, a few heads of small dims); nothing is downloaded.
Each builder returns ``(model, make_inputs)`` where ``make_inputs(height, width, ...)`` returns forward kwargs
for a latent grid of ``height x width`` tokens (and ``frames`` for video models).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers tests need diffusers (the 'test' extra)")


def model_class(name: str):
    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return cls


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def flux():
    torch.manual_seed(0)
    model = model_class("FluxTransformer2DModel")(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 0.5, seed: int = 0):
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        return {
            "hidden_states": _randn(batch, height * width, 4, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 32, seed=seed + 1),
            "pooled_projections": _randn(batch, 32, seed=seed + 2),
            "timestep": torch.full((batch,), timestep),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(text, 3),
        }

    return model, inputs


def sd3():
    torch.manual_seed(0)
    model = model_class("SD3Transformer2DModel")(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 500.0, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, height, width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 32, seed=seed + 1),
            "pooled_projections": _randn(batch, 64, seed=seed + 2),
            "timestep": torch.full((batch,), timestep),
        }

    return model, inputs


def dit():
    torch.manual_seed(0)
    model = model_class("DiTTransformer2DModel")(
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
        attention_head_dim=8, num_layers=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
        patch_size=2, sample_size=8,
    ).eval()

    def inputs(height: int, width: int, *, batch: int = 2, timestep: float = 500.0, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, 2 * height, 2 * width, seed=seed),
            "timestep": torch.full((batch,), timestep),
            "class_labels": torch.arange(batch),
        }

    return model, inputs


def pixart():
    torch.manual_seed(0)
    model = model_class("PixArtTransformer2DModel")(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=None,
    ).eval()

    def inputs(height: int, width: int, *, text: int = 5, batch: int = 2, timestep: float = 500.0, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
            "added_cond_kwargs": {"aspect_ratio": None, "resolution": None},
        }

    return model, inputs


def wan():
    torch.manual_seed(0)
    model = model_class("WanTransformer3DModel")(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, frames, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
        }

    return model, inputs


def hunyuan_video():
    torch.manual_seed(0)
    model = model_class("HunyuanVideoTransformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               real_text: tuple[int, ...] | None = None, seed: int = 0):
        mask = torch.ones(batch, text, dtype=torch.bool)
        for b, real in enumerate(real_text or ()):
            mask[b, real:] = False
        return {
            "hidden_states": _randn(batch, 4, frames, height, width, seed=seed),
            "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "encoder_attention_mask": mask,
            "pooled_projections": _randn(batch, 8, seed=seed + 2),
            "guidance": torch.full((batch,), 3.5),
        }

    return model, inputs


FAMILIES = {
    "flux": flux,
    "sd3": sd3,
    "dit": dit,
    "pixart": pixart,
    "wan": wan,
    "hunyuan_video": hunyuan_video,
}


@torch.no_grad()
def run(model, kwargs) -> torch.Tensor:
    return model(**kwargs, return_dict=False)[0]
