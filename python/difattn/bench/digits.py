"""The digits PixelDiT as a source of real attention patterns and as an end-to-end check.

``examples/train_pixel_dit_digits.py --method dense --size 16 --depth 4 --heads 4 --hidden 64 --steps 1500
--save benchmarks/data/pixel_dit_digits16.pt`` trains it once (rectified flow on scikit-learn's 8x8 digits
upsampled to 16x16, one token per pixel: 256 tokens, 2-D RoPE, RMS q/k norm, 4 layers of 4 heads of dim 16)
and stores its weights (float16, about 0.6 MB) with its configuration. Then, with no dataset:

- **captured**: the q, k, v of every layer at the middle step of a dense sampling run (conditional pass),
  layers stacked along the head axis, ``(4 samples, 16, 256, 16)``;
- **pipeline**: class-conditional samples (classifier-free guidance 2, 20 Euler steps, two per class, the same
  noise) with the first two settings of each method in every attention layer, against the dense samples: PSNR and
  SSIM of the images, the first setting also with the first steps or the first layer kept dense.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..grid import TokenGrid
from ..models import PixelDiT
from .capture import SDPACapture, euler_flow
from .cases import SMALL_GRID_CASES, Shape

DEFAULT_WEIGHTS = Path("benchmarks/data/pixel_dit_digits16.pt")
SAMPLE_STEPS = 20
CFG_SCALE = 2.0
SEED = 0
_CAPTURE_SAMPLES = 4
END_TO_END_METHODS = ("clear", "grat", "pisa", "llsa")


def load(path: Path, method: str = "dense", options: dict | None = None) -> PixelDiT:
    """The saved PixelDiT (float32, eval mode) with ``method`` in every attention layer."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = PixelDiT(**saved["config"], attention=method, attention_options=dict(options or {}))
    model.load_state_dict({name: t.float() for name, t in saved["state_dict"].items()})
    return model.eval()


def _labels(model: PixelDiT, samples: int) -> torch.Tensor:
    return torch.arange(samples) % model.y_embedder.num_classes


def _noise(model: PixelDiT, samples: int) -> torch.Tensor:
    side = model.grid_size[0]
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(samples, model.in_channels, side, side, generator=gen)


@torch.no_grad()
def sample(model_at_step, labels: torch.Tensor, noise: torch.Tensor, steps: int = SAMPLE_STEPS) -> torch.Tensor:
    """Class-conditional images ``(S, C, H, W)`` in [-1, 1] from ``noise``, with classifier-free guidance;
    ``model_at_step(i)`` is the model that denoises step i."""
    def velocity(x, t, i):
        model = model_at_step(i)
        null = torch.full_like(labels, model.y_embedder.num_classes)
        both = model.forward_with_cfg(torch.cat([x, x]), torch.full((2 * len(x),), t * 1000), torch.cat([labels, null]),
                                      CFG_SCALE)
        return both[: len(x), : x.shape[1]]

    return euler_flow(velocity, noise, steps).clamp(-1, 1)


@torch.no_grad()
def capture(model: PixelDiT) -> tuple[TokenGrid, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grid, q, k, v)`` of every layer at the middle step of a dense run, layers stacked along the heads."""
    labels, noise = _labels(model, _CAPTURE_SAMPLES), _noise(model, _CAPTURE_SAMPLES)
    half = SAMPLE_STEPS // 2
    x = sample(lambda i: model, labels, noise, half) if half else noise
    t = 1 - half / SAMPLE_STEPS
    with SDPACapture() as cap:
        model(x, torch.full((len(x),), t * 1000), labels)
    q, k, v = cap.stacked()
    return TokenGrid(*model.grid_size), q, k, v


# (dense_steps, dense_layers) variants run for the first setting of each method.
SCHEDULES = ((0, ()), (SAMPLE_STEPS // 4, ()), (0, (0,)))


def quality_records(path: Path, methods) -> list[dict]:
    """Captured and end-to-end quality records of the digits PixelDiT saved at ``path`` (float32 on the CPU, the
    fastest backend there), for ``methods`` (linear attention and DyDiLA only on captured patterns: a model
    trained with dense attention has no weights for their extra layers)."""
    from .quality import output_errors, psnr, ssim
    from .quality_suite import evaluate, record
    from .runner import runnable_backends

    dense = load(path)
    grid, q, k, v = capture(dense)
    shape = Shape(grid, batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[-1])
    runs = [(c, runnable_backends(c.method, q.device, q.dtype, c.options)[0])
            for m in methods for c in SMALL_GRID_CASES[m]]
    source = f"digits PixelDiT 16x16, {len(dense.blocks)} layers x {dense.num_heads} heads, step {SAMPLE_STEPS // 2}/{SAMPLE_STEPS}"
    out = [record(c, b, "captured", source, shape, torch.float32, fields)
           for (c, b), fields in zip(runs, evaluate(runs, grid, q, k, v)) if fields]

    samples = 2 * dense.y_embedder.num_classes
    labels, noise = _labels(dense, samples), _noise(dense, samples)
    reference_images = sample(lambda i: dense, labels, noise)
    image_shape = Shape(grid, batch=samples, heads=dense.num_heads, head_dim=q.shape[-1])
    for method in (m for m in methods if m in END_TO_END_METHODS):
        for n, case in enumerate(SMALL_GRID_CASES[method][:2]):
            for dense_steps, dense_layers in SCHEDULES if n == 0 else SCHEDULES[:1]:
                sparse = load(path, method, case.options)
                for i in dense_layers:
                    sparse.blocks[i].attn = dense.blocks[i].attn
                try:
                    images = sample(lambda i: dense if i < dense_steps else sparse, labels, noise)
                except ValueError:  # a setting this grid cannot take
                    continue
                errors = output_errors(images[:, None], reference_images[:, None])
                fields = {"rel_err_dense": errors["rel_err_dense"], "cos_dense": errors["cos_dense"],
                          "psnr": psnr(images, reference_images), "ssim": ssim(images, reference_images),
                          "steps": SAMPLE_STEPS, "dense_steps": dense_steps, "dense_layers": list(dense_layers)}
                out.append(record(case, "auto", "pipeline", f"digits PixelDiT 16x16, {samples} samples, cfg {CFG_SCALE}",
                                  image_shape, torch.float32, fields))
    return out
