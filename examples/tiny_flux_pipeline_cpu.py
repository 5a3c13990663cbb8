"""A whole FLUX pipeline from tiny random parts, on CPU in seconds, with difattn's methods (no downloads).

    pip install "difattn[diffusers]"
    python examples/tiny_flux_pipeline_cpu.py --method grat --steps 4

Every part of ``diffusers.FluxPipeline`` is built here with random weights at toy sizes: the FLUX transformer,
the VAE, the CLIP and T5 text encoders, and word-level tokenizers over a small vocabulary. The images it makes are
noise, but every step of a real generation runs: prompt encoding, the denoising loop (with classifier-free
guidance's text and timestep inputs), VAE decoding. The script generates once with the stock attention, once after
``difattn.diffusers.apply`` and once after ``remove``, and checks that ``remove`` gives the stock images back bit
for bit. Swap in ``FluxPipeline.from_pretrained(...)`` for real weights; nothing else changes.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import difattn.diffusers

_WORDS = "a an the of in on at photo photograph painting red green blue fox cat dog tree snow forest city".split()


def _tokenizer(max_length: int):
    """A word-level fast tokenizer over ``_WORDS`` (unknown words map to ``<unk>``), padded to ``max_length``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "<unk>", "</s>", *_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_length)


def tiny_flux_pipeline(seed: int = 0):
    """A ``diffusers.FluxPipeline`` of tiny randomly initialised parts (a few MB), on CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = len(_WORDS) + 3
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=77, pad_token_id=0, eos_token_id=2, bos_token_id=2,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=0,
    ))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=_tokenizer(77),
        text_encoder_2=t5, tokenizer_2=_tokenizer(32), transformer=transformer,
    )
    for part in (transformer, vae, clip, t5):
        part.eval()  # as from_pretrained leaves them: no dropout
    return pipe


def generate(pipe, prompt: str, size: int, steps: int) -> torch.Tensor:
    """Images ``(1, 3, size, size)`` in [0, 1] from a fixed seed."""
    return pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                max_sequence_length=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=difattn.diffusers.METHODS, default="grat",
                        help="the attention method apply() installs")
    parser.add_argument("--size", type=int, default=64,
                        help="image side in pixels (the tiny VAE downsamples by 2: a (size/4)^2-token latent grid)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--prompt", default="a photograph of a red fox in a snow forest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # shows apply()'s summary

    pipe = tiny_flux_pipeline()
    options = {"clear": {"radius": 3}, "grat": {"group": (4, 4)}, "pisa": {"density": 0.25, "block_size": 16},
               "llsa": {"block_size": 4, "topk": 4}}[args.method]
    start = time.perf_counter()
    stock = generate(pipe, args.prompt, args.size, args.steps)
    summary = difattn.diffusers.apply(pipe.transformer, args.method, **options)
    sparse = generate(pipe, args.prompt, args.size, args.steps)
    difattn.diffusers.remove(pipe.transformer)
    restored = generate(pipe, args.prompt, args.size, args.steps)
    seconds = time.perf_counter() - start
    if not torch.equal(restored, stock):
        raise SystemExit("remove() did not restore the stock images")
    result = {"layers": summary.replaced, "max_abs_diff_vs_stock": float((sparse - stock).abs().max()),
              "seconds": seconds}
    print(f"{args.method}: {len(summary.replaced)} layers replaced; images {tuple(sparse.shape)}, "
          f"max |difattn - stock| = {result['max_abs_diff_vs_stock']:.3g}; remove() restores the stock images; "
          f"3 generations in {seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
