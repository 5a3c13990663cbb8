"""Tiny randomly initialised diffusers transformers (FLUX, SD3, Wan) as sources of attention patterns and as
end-to-end checks of :func:`difattn.diffusers.apply`.

Each family is built from a fixed seed at a size where the methods have room to differ (a 24x24 latent with 16
text tokens for FLUX, text first, and SD3, text last; 3 frames of 12x12 for Wan; 4 heads of dim 32, two to four
attention layers); nothing is downloaded. Random weights attend almost uniformly, so each model first takes
:data:`TRAIN_STEPS` rectified-flow steps (AdamW, lr 1e-3, batch 2, fixed conditioning) on smooth random latents
(:func:`difattn.bench.inputs.smooth_field`, length 2 pixels): learning to denoise spatially correlated data makes
attention local (CLEAR's recall at radius 4 grows from 0.12 to 0.50 on FLUX, 0.14 to 0.49 on SD3, 0.23 to 0.28 on
Wan, whose 2x2 patches make the latents' smoothness less than a token). The latent
is then sampled with a rectified-flow Euler loop (6 steps, batch 2, fixed noise and conditioning):

- **captured**: the q, k, v of every self-attention layer at the middle step of the dense run, layers stacked
  along the heads;
- **pipeline**: the final latent with the first two settings of each method applied (the first also with the first
  steps or the first layer dense) against the dense run's: PSNR, SSIM, relative error.

A hundred steps on noise-like data is not a trained model: these rows check that ``apply`` and its schedules work
end to end and how an attention error propagates through a network, with attention that has some structure.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from ..grid import TokenGrid
from .capture import SDPACapture, euler_flow
from .cases import SMALL_GRID_CASES, Shape
from .inputs import smooth_field

STEPS = 6
TRAIN_STEPS = 100
SEED = 0
_BATCH = 2
_TEXT = 16
END_TO_END_METHODS = ("clear", "grat", "pisa", "llsa")
# (dense_steps, dense_layers) variants run for the first setting of each method.
SCHEDULES = ((0, ()), (STEPS // 4, ()), (0, (0,)))


@dataclass(frozen=True)
class Family:
    """A tiny model: how to build it, its grid, its noise latent, and its forward kwargs for a latent ``x`` at
    flow time ``t`` (``to_image`` turns a latent into ``(B, C, [F,] H, W)`` for SSIM, ``from_image`` back)."""

    name: str
    build: Callable[[], torch.nn.Module]
    grid: TokenGrid
    latent_shape: tuple[int, ...]
    kwargs: Callable[[torch.Tensor, float, dict], dict]
    conditioning: Callable[[], dict]
    image_grid: TokenGrid  # the pixels of the latent (before the model's patchify)
    to_image: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    from_image: Callable[[torch.Tensor], torch.Tensor] = lambda x: x


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux() -> Family:
    import diffusers

    side = 24

    def build():
        torch.manual_seed(SEED)
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12],
        ).eval()

    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    cond = lambda: {"encoder_hidden_states": _randn(_BATCH, _TEXT, 32, seed=SEED + 1),  # noqa: E731
                    "pooled_projections": _randn(_BATCH, 32, seed=SEED + 2),
                    "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(_TEXT, 3)}
    return Family("flux", build, TokenGrid(side, side, text_tokens=_TEXT, text_position="first"), (_BATCH, side * side, 4),
                  lambda x, t, c: {"hidden_states": x, "timestep": torch.full((_BATCH,), t), **c}, cond,
                  TokenGrid(side, side), lambda x: x.transpose(1, 2).unflatten(2, (side, side)),
                  lambda x: x.flatten(2).transpose(1, 2))


def _sd3() -> Family:
    import diffusers

    side = 24

    def build():
        torch.manual_seed(SEED)
        return diffusers.SD3Transformer2DModel(
            sample_size=side, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=32, num_attention_heads=4,
            caption_projection_dim=128, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=48, qk_norm="rms_norm",
        ).eval()

    cond = lambda: {"encoder_hidden_states": _randn(_BATCH, _TEXT, 32, seed=SEED + 1),  # noqa: E731
                    "pooled_projections": _randn(_BATCH, 64, seed=SEED + 2)}
    return Family("sd3", build, TokenGrid(side, side, text_tokens=_TEXT, text_position="last"), (_BATCH, 4, side, side),
                  lambda x, t, c: {"hidden_states": x, "timestep": torch.full((_BATCH,), t * 1000), **c}, cond,
                  TokenGrid(side, side))


def _wan() -> Family:
    import diffusers

    frames, side = 3, 12

    def build():
        torch.manual_seed(SEED)
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()

    cond = lambda: {"encoder_hidden_states": _randn(_BATCH, _TEXT, 16, seed=SEED + 1)}  # noqa: E731
    return Family("wan", build, TokenGrid(side, side, frames=frames), (_BATCH, 4, frames, 2 * side, 2 * side),
                  lambda x, t, c: {"hidden_states": x, "timestep": torch.full((_BATCH,), t * 1000), **c}, cond,
                  TokenGrid(2 * side, 2 * side, frames=frames))


FAMILIES = {"flux": _flux, "sd3": _sd3, "wan": _wan}


def available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def _smooth_latents(family: Family, gen: torch.Generator) -> torch.Tensor:
    """A batch of latents whose channels are smooth unit-variance random fields over the latent's pixels."""
    g = family.image_grid
    fields = [smooth_field(g, family.latent_shape[-1] if family.name == "flux" else family.latent_shape[1], 2.0, 1.0, gen)
              for _ in range(_BATCH)]  # each (pixels, C)
    image = torch.stack([f.T.reshape(-1, *((g.frames,) if g.frames > 1 else ()), g.height, g.width) for f in fields])
    return family.from_image(image.float())


def train(family: Family, model: torch.nn.Module, steps: int = TRAIN_STEPS) -> torch.nn.Module:
    """``steps`` rectified-flow steps on smooth random latents (deterministic in :data:`SEED`); returns the model
    in eval mode."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cond = family.conditioning()
    model.train()
    for _ in range(steps):
        x = _smooth_latents(family, gen)
        t = float(torch.sigmoid(torch.randn((), generator=gen)))
        noise = torch.randn(x.shape, generator=gen)
        prediction = model(**family.kwargs((1 - t) * x + t * noise, t, cond), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction, noise - x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def run(family: Family, model: torch.nn.Module, steps: int = STEPS) -> torch.Tensor:
    """The final latent of an Euler run from the family's fixed noise (``steps`` steps)."""
    cond = family.conditioning()
    noise = _randn(*family.latent_shape, seed=SEED)
    return euler_flow(lambda x, t, i: model(**family.kwargs(x, t, cond), return_dict=False)[0], noise, steps)


@torch.no_grad()
def capture(family: Family, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of every self-attention layer at the middle step of the dense run, stacked along the heads."""
    half = STEPS // 2
    x = run(family, model, half)
    with SDPACapture() as cap:
        model(**family.kwargs(x, 1 - half / STEPS, family.conditioning()), return_dict=False)
    return cap.stacked()


def quality_records(methods) -> list[dict]:
    """Captured and end-to-end records of every family, each trained :data:`TRAIN_STEPS` steps first (empty
    without diffusers)."""
    if not available():
        return []
    import difattn.diffusers as dd

    from .quality import output_errors, psnr, ssim
    from .quality_suite import evaluate, record
    from .runner import runnable_backends

    out = []
    for make in FAMILIES.values():
        family = make()
        model = train(family, family.build())
        q, k, v = capture(family, model)
        shape = Shape(family.grid, batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[-1])
        runs = [(c, runnable_backends(c.method, q.device, q.dtype, c.options)[0])
                for m in methods for c in SMALL_GRID_CASES[m]]
        source = (f"tiny {family.name} ({TRAIN_STEPS} training steps on smooth random latents), "
                  f"{len(dd.attention_layers(model))} layers, step {STEPS // 2}/{STEPS}")
        out += [record(c, b, "captured", source, shape, torch.float32, fields)
                for (c, b), fields in zip(runs, evaluate(runs, family.grid, q, k, v)) if fields]

        reference = run(family, model)
        latent_shape = Shape(family.grid, batch=_BATCH, heads=shape.heads // len(dd.attention_layers(model)),
                             head_dim=shape.head_dim)
        for method in (m for m in methods if m in END_TO_END_METHODS):
            for n, case in enumerate(SMALL_GRID_CASES[method][:2]):
                for dense_steps, dense_layers in SCHEDULES if n == 0 else SCHEDULES[:1]:
                    dd.apply(model, method, dense_steps=dense_steps, dense_layers=dense_layers, **case.options)
                    try:
                        latent = run(family, model)
                    except ValueError:  # a setting this grid cannot take
                        continue
                    finally:
                        dd.remove(model)
                    errors = output_errors(latent[:, None], reference[:, None])
                    fields = {"rel_err_dense": errors["rel_err_dense"], "cos_dense": errors["cos_dense"],
                              "psnr": psnr(latent, reference),
                              "ssim": ssim(family.to_image(latent), family.to_image(reference)),
                              "steps": STEPS, "dense_steps": dense_steps, "dense_layers": list(dense_layers)}
                    out.append(record(case, "auto", "pipeline", f"tiny {family.name} ({TRAIN_STEPS} training steps), final latent",
                                      latent_shape, torch.float32, fields))
    return out
