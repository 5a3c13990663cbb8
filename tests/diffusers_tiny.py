"""Tiny randomly initialised diffusers transformers of every supported family, and inputs for them.

Configs follow diffusers' own model tests (a layer or two, a few heads of small dims); nothing is downloaded.
Each builder returns ``(model, make_inputs)`` where ``make_inputs(height, width, ...)`` returns forward kwargs
for a latent grid of ``height x width`` tokens (and ``frames`` for video models). ``LAYOUTS`` says, for each
family, where a latent token lives in the model's input, independently of difattn, so a test can check the grid
difattn reads by perturbing one token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

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


def _text_mask(batch: int, text: int, real_text: tuple[int, ...] | None) -> torch.Tensor:
    """``(batch, text)`` bool: sample b has ``real_text[b]`` real tokens, then padding."""
    mask = torch.ones(batch, text, dtype=torch.bool)
    for b, real in enumerate(real_text or ()):
        mask[b, real:] = False
    return mask


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
        return {
            "hidden_states": _randn(batch, 4, frames, height, width, seed=seed),
            "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "encoder_attention_mask": _text_mask(batch, text, real_text),
            "pooled_projections": _randn(batch, 8, seed=seed + 2),
            "guidance": torch.full((batch,), 3.5),
        }

    return model, inputs


def _ids(frames: int, height: int, width: int, columns: int = 3) -> torch.Tensor:
    """Position ids ``(frames * height * width, columns)``: (frame, row, column[, 0]) in raster order."""
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    ids = [t, y, x] + [torch.zeros_like(t)] * (columns - 3)
    return torch.stack(ids, dim=-1).reshape(-1, columns).float()


def flux2():
    torch.manual_seed(0)
    model = model_class("Flux2Transformer2DModel")(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 0.5, seed: int = 0):
        text_ids = torch.zeros(text, 4)
        text_ids[:, 3] = torch.arange(text)
        return {
            "hidden_states": _randn(batch, height * width, 4, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 32, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
            "guidance": torch.full((batch,), 1.0),
            "img_ids": _ids(1, height, width, columns=4),
            "txt_ids": text_ids,
        }

    return model, inputs


def chroma():
    torch.manual_seed(0)
    model = model_class("ChromaTransformer2DModel")(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 0.5,
               real_text: tuple[int, ...] | None = None, seed: int = 0):
        image = torch.ones(batch, height * width, dtype=torch.bool)
        return {
            "hidden_states": _randn(batch, height * width, 4, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 32, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
            "img_ids": _ids(1, height, width),
            "txt_ids": torch.zeros(text, 3),
            "attention_mask": torch.cat([_text_mask(batch, text, real_text), image], dim=1),
        }

    return model, inputs


def qwen_image():
    torch.manual_seed(0)
    model = model_class("QwenImageTransformer2DModel")(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 0.5,
               real_text: tuple[int, ...] | None = None, seed: int = 0):
        kwargs = {
            "hidden_states": _randn(batch, height * width, 16, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "encoder_hidden_states_mask": _text_mask(batch, text, real_text),
            "timestep": torch.full((batch,), timestep),
            "img_shapes": [(1, height, width)] * batch,
        }
        if "txt_seq_lens" in inspect.signature(model.forward).parameters:  # older releases (0.35) need the lengths
            kwargs["txt_seq_lens"] = [text] * batch
        return kwargs

    return model, inputs


def cogview4():
    torch.manual_seed(0)
    model = model_class("CogView4Transformer2DModel")(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4,
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 500.0, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 8, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
            "original_size": torch.tensor([[32, 32]] * batch),
            "target_size": torch.tensor([[32, 32]] * batch),
            "crop_coords": torch.tensor([[0, 0]] * batch),
        }

    return model, inputs


def auraflow():
    torch.manual_seed(0)
    model = model_class("AuraFlowTransformer2DModel")(
        sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        out_channels=4, pos_embed_max_size=256,
    ).eval()

    def inputs(height: int, width: int, *, text: int = 7, batch: int = 2, timestep: float = 500.0, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 32, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
        }

    return model, inputs


def hunyuan_video15():
    torch.manual_seed(0)
    model = model_class("HunyuanVideo15Transformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               real_text: tuple[int, ...] | None = None, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, frames, height, width, seed=seed),
            "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "encoder_attention_mask": _text_mask(batch, text, real_text),
            "encoder_hidden_states_2": _randn(batch, 3, 8, seed=seed + 2),
            "encoder_attention_mask_2": torch.ones(batch, 3, dtype=torch.bool),
            "image_embeds": torch.zeros(batch, 2, 12),  # text-to-video: the image tokens are padding
        }

    return model, inputs


def hunyuan_image():
    torch.manual_seed(0)
    model = model_class("HunyuanImageTransformer2DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4),
    ).eval()

    def inputs(height: int, width: int, *, text: int = 6, batch: int = 2, timestep: float = 500.0,
               real_text: tuple[int, ...] | None = None, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, height, width, seed=seed),
            "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "encoder_attention_mask": _text_mask(batch, text, real_text),
        }

    return model, inputs


def ltx_video():
    torch.manual_seed(0)
    model = model_class("LTXVideoTransformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16,
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               seed: int = 0):
        return {
            "hidden_states": _randn(batch, frames * height * width, 4, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
            "encoder_attention_mask": torch.ones(batch, text, dtype=torch.bool),
            "num_frames": frames, "height": height, "width": width,
        }

    return model, inputs


def cogvideox():
    """CogVideoX 1.5 style: temporal patches of 2 frames, RoPE instead of absolute positions (any prompt length;
    the rotary tables come from the pipeline, so none here)."""
    torch.manual_seed(0)
    model = model_class("CogVideoXTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, patch_size=2, patch_size_t=2, use_rotary_positional_embeddings=True,
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               seed: int = 0):
        return {
            "hidden_states": _randn(batch, 2 * frames, 4, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 8, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
        }

    return model, inputs


def mochi():
    torch.manual_seed(0)
    model = model_class("MochiTransformer3DModel")(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               real_text: tuple[int, ...] | None = None, seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, frames, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
            "encoder_attention_mask": _text_mask(batch, text, real_text),
        }

    return model, inputs


def allegro():
    torch.manual_seed(0)
    model = model_class("AllegroTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8,
    ).eval()

    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               seed: int = 0):
        return {
            "hidden_states": _randn(batch, 4, frames, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 8, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
        }

    return model, inputs


_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def _wan_inputs(model, *, control_channels: int = 0):
    def inputs(height: int, width: int, *, frames: int = 2, text: int = 6, batch: int = 2, timestep: float = 500.0,
               seed: int = 0):
        kwargs = {
            "hidden_states": _randn(batch, 4, frames, 2 * height, 2 * width, seed=seed),
            "encoder_hidden_states": _randn(batch, text, 16, seed=seed + 1),
            "timestep": torch.full((batch,), timestep),
        }
        if control_channels:
            kwargs["control_hidden_states"] = _randn(batch, control_channels, frames, 2 * height, 2 * width,
                                                     seed=seed + 2)
        return kwargs

    return inputs


def skyreels_v2():
    torch.manual_seed(0)
    model = model_class("SkyReelsV2Transformer3DModel")(**_WAN_CONFIG).eval()
    return model, _wan_inputs(model)


def chronoedit():
    torch.manual_seed(0)
    model = model_class("ChronoEditTransformer3DModel")(**_WAN_CONFIG).eval()
    return model, _wan_inputs(model)


def wan_vace():
    torch.manual_seed(0)
    model = model_class("WanVACETransformer3DModel")(**_WAN_CONFIG, vace_layers=[0], vace_in_channels=8).eval()
    return model, _wan_inputs(model, control_channels=8)


def sana():
    torch.manual_seed(0)
    return model_class("SanaTransformer2DModel")(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32,
    ).eval()


@dataclass(frozen=True)
class Layout:
    """Where latent token ``(t, y, x)`` lives in a family's input, known without difattn.

    ``form``: ``"packed"`` (``hidden_states`` is ``(B, N, C)`` in raster order), ``"bchw"``, ``"bcfhw"`` or
    ``"bfchw"`` (latents, token ``(t, y, x)`` at ``(t * pt, y * ph, x * pw)``); ``patch``: ``(pt, ph, pw)``;
    ``text``: the side of the text in the joint layers, None when no difattn layer sees text.
    """

    form: str
    patch: tuple[int, int, int] = (1, 1, 1)
    text: str | None = None


LAYOUTS = {
    "flux": Layout("packed", text="first"),
    "flux2": Layout("packed", text="first"),
    "chroma": Layout("packed", text="first"),
    "sd3": Layout("bchw", text="last"),
    "qwen_image": Layout("packed", text="first"),
    "cogview4": Layout("bchw", (1, 2, 2), text="first"),
    "auraflow": Layout("bchw", (1, 2, 2), text="first"),
    "hunyuan_image": Layout("bchw", text="last"),
    "dit": Layout("bchw", (1, 2, 2)),
    "pixart": Layout("bchw", (1, 2, 2)),
    "wan": Layout("bcfhw", (1, 2, 2)),
    "skyreels_v2": Layout("bcfhw", (1, 2, 2)),
    "chronoedit": Layout("bcfhw", (1, 2, 2)),
    "wan_vace": Layout("bcfhw", (1, 2, 2)),
    "allegro": Layout("bcfhw", (1, 2, 2)),
    "ltx_video": Layout("packed"),
    "hunyuan_video": Layout("bcfhw", text="last"),
    "hunyuan_video15": Layout("bcfhw", text="last"),
    "mochi": Layout("bcfhw", (1, 2, 2), text="last"),
    "cogvideox": Layout("bfchw", (2, 2, 2), text="first"),
}


FAMILIES = {
    "flux": flux,
    "flux2": flux2,
    "chroma": chroma,
    "sd3": sd3,
    "qwen_image": qwen_image,
    "cogview4": cogview4,
    "auraflow": auraflow,
    "hunyuan_image": hunyuan_image,
    "dit": dit,
    "pixart": pixart,
    "wan": wan,
    "skyreels_v2": skyreels_v2,
    "chronoedit": chronoedit,
    "wan_vace": wan_vace,
    "allegro": allegro,
    "ltx_video": ltx_video,
    "hunyuan_video": hunyuan_video,
    "hunyuan_video15": hunyuan_video15,
    "mochi": mochi,
    "cogvideox": cogvideox,
}
PADDED_TEXT = {"hunyuan_video", "hunyuan_video15", "hunyuan_image", "mochi", "qwen_image", "chroma"}


@torch.no_grad()
def run(model, kwargs) -> torch.Tensor:
    return model(**kwargs, return_dict=False)[0]


def layer_call(model, processor, kwargs, monkeypatch) -> dict[str, torch.Tensor]:
    """Run ``model`` once and return the ``q``, ``k``, ``v`` and ``out`` of the attention call ``processor`` made."""
    from difattn.diffusers import _processor

    seen: dict[str, torch.Tensor] = {}
    original = _processor.LayerAttention.__call__

    def spy(self, query, key, value, **options):
        out = original(self, query, key, value, **options)
        if self.processor is processor:
            seen.update(q=query, k=key, v=value, out=out)
        return out

    monkeypatch.setattr(_processor.LayerAttention, "__call__", spy)
    run(model, kwargs)
    return seen
