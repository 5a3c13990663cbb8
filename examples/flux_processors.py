"""Swap the attention of a FLUX pipeline for difattn's methods (documented usage; needs a GPU and the weights).

    pip install "difattn[diffusers]"
    python examples/flux_processors.py --method clear --size 2048
    python examples/flux_processors.py --method clear --radius 16 --clear-checkpoint clear_local_16_down_4.safetensors

``difattn.diffusers.apply`` replaces the attention call of every FLUX attention layer (19 double-stream and 38
single-stream blocks) and keeps the model's projections, q/k norms and RoPE. The token geometry is read from
each call, so any resolution works without reconfiguring anything; ``remove`` restores the stock processors.

Settings the papers report for FLUX:

- CLEAR: ``radius=16`` (or 8/32) needs the distilled weights of the CLEAR authors, which load on top of
  FLUX.1-dev (``--clear-checkpoint``); the ``*_down_4`` checkpoints also carry the global-token pooling weights
  (``down_factor=4``). Without them CLEAR is an approximation. Above 1024² the released inference sets
  ``proportional_attention=True`` (``scale = sqrt(log_4608(c·N) / head_dim)``, ``c = 10`` with global tokens):
  ``--proportional-attention``.
- GRAT (training-free): ``group=(16, 16)``, ``pattern="criss_cross"`` (quality) or ``"neighbors"`` (speed).
- PISA (training-free): ``density=0.15``, the first four attention layers dense, and the routing bias of the
  authors' released FLUX processor, ``routing_bias="uncentered"`` (``ln(‖H_j‖_F + 1e-5)``; ``True`` is the
  paper's centred form).
- Any method: ``dense_steps=k`` keeps the first k denoising steps dense.
"""

from __future__ import annotations

import argparse
import time

import torch

import difattn.diffusers


def method_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(method options, schedule options)`` for :func:`difattn.diffusers.apply`."""
    if args.method == "clear":
        options = {"radius": args.radius}
        if args.down_factor > 1:
            options["down_factor"] = args.down_factor
        if args.proportional_attention:
            options["proportional_attention"] = True
        return options, {}
    if args.method == "grat":
        return {"group": (16, 16), "pattern": args.grat_pattern}, {}
    if args.method == "pisa":
        return {"density": 0.15, "routing_bias": "uncentered"}, {"dense_layers": range(4)}
    if args.method == "llsa":
        return {"block_size": 16, "topk": 8}, {}
    return {}, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--method", choices=difattn.diffusers.METHODS, default="clear")
    parser.add_argument("--radius", type=float, default=16.0, help="CLEAR radius in latent tokens (16 px each)")
    parser.add_argument("--down-factor", type=int, default=1, help="CLEAR global tokens (4 for *_down_4 weights)")
    parser.add_argument("--proportional-attention", action="store_true",
                        help="CLEAR's released high-resolution inference (attention scale from log(N))")
    parser.add_argument("--clear-checkpoint", help="a CLEAR safetensors file from huggingface.co/Huage001/CLEAR")
    parser.add_argument("--grat-pattern", choices=("neighbors", "criss_cross"), default="criss_cross")
    parser.add_argument("--dense-steps", type=int, default=0)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--prompt", default="a photograph of a red fox in a snowy forest, golden hour")
    parser.add_argument("--out", default="flux_difattn.png")
    args = parser.parse_args()

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda")
    options, schedule = method_options(args)
    difattn.diffusers.apply(pipe.transformer, args.method, dense_steps=args.dense_steps, **schedule, **options)

    if args.clear_checkpoint:
        # Projection weights under their diffusers names, pooling weights at
        # <block>.attn.processor.spatial_weight: both land in place once the CLEAR processors are applied.
        from safetensors.torch import load_file

        missing, unexpected = pipe.transformer.load_state_dict(load_file(args.clear_checkpoint), strict=False)
        if unexpected:
            raise SystemExit(f"unexpected keys in {args.clear_checkpoint}: {unexpected[:5]} ...")

    generator = torch.Generator("cuda").manual_seed(0)
    start = time.perf_counter()
    image = pipe(
        args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps, generator=generator
    ).images[0]
    print(f"{args.method} {options}: {time.perf_counter() - start:.1f} s for {args.steps} steps")
    image.save(args.out)

    difattn.diffusers.remove(pipe.transformer)  # the stock FLUX processors again


if __name__ == "__main__":
    main()
