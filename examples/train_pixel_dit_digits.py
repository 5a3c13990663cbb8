"""Train a tiny pixel-space DiT on scikit-learn's handwritten digits, on the CPU, with any difattn method.

    python examples/train_pixel_dit_digits.py --method llsa            # a few minutes on a 2-core CPU
    python examples/train_pixel_dit_digits.py --method clear --option radius=2 --size 16 --steps 2000

The 1,797 8x8 digits (one token per pixel: 64 tokens; ``--size 16`` upsamples them to 256 tokens, about four
times the work) are learned with rectified flow (``x_t = (1 - t) x + t ε``, the model predicts ``ε - x``) by
:class:`difattn.models.PixelDiT` (patch 1, 2-D RoPE, RMS q/k norm), conditioned on the digit class. Writes to
``--out``: ``loss.png`` (training loss), ``samples.png`` (one row per class, sampled with classifier-free
guidance) and ``metrics.json``; ``--save PATH`` also writes the trained weights (float16) with the model's
configuration, as ``difattn bench --quality`` loads them (``difattn.bench.digits``). Needs ``scikit-learn`` and
``matplotlib``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difattn.models import PixelDiT

# Options that suit the 8x8 pixel grid (64 tokens; also valid at 16x16); --option overrides them.
DEFAULT_OPTIONS = {
    "dense": {},
    "clear": {"radius": 3},
    "grat": {"group": (2, 2)},
    "pisa": {"density": 0.5, "block_size": 16},
    "llsa": {"block_size": 4, "topk": 4},
    "linear": {},
    "dydila": {},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(DEFAULT_OPTIONS), default="llsa")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a method option, e.g. radius=3 or group=(4,4); repeatable")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=8, help="image side in pixels (digits are 8x8; 16 upsamples)")
    parser.add_argument("--hidden", type=int, default=64, help="model width")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=30, help="Euler steps when sampling")
    parser.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("digits_out"))
    parser.add_argument("--save", type=Path, help="also write the weights (float16) and the model config here")
    return parser.parse_args(argv)


def method_options(method: str, overrides: list[str]) -> dict:
    options = dict(DEFAULT_OPTIONS[method])
    for item in overrides:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--option expects NAME=VALUE, got {item!r}")
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name] = value
    return options


def load_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(1797, 1, size, size)`` in [-1, 1] and labels ``(1797,)``."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


def flow_loss(model: PixelDiT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rectified flow: predict the velocity ``ε - x`` at ``x_t = (1 - t) x + t ε``, t from a logit-normal."""
    t = torch.sigmoid(torch.randn(x.shape[0]))
    noise = torch.randn_like(x)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    return F.mse_loss(model(x_t, t * 1000, y), noise - x)


@torch.no_grad()
def sample(model: PixelDiT, labels: torch.Tensor, size: int, steps: int, cfg: float) -> torch.Tensor:
    """Euler integration from noise (t = 1) to data (t = 0), with classifier-free guidance."""
    model.eval()
    x = torch.randn(len(labels), 1, size, size)
    null = torch.full_like(labels, model.y_embedder.num_classes)
    y = torch.cat([labels, null])
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        velocity = model.forward_with_cfg(torch.cat([x, x]), torch.full((2 * len(labels),), t * 1000), y, cfg)
        x = x + (t_next - t) * velocity[: len(labels)]
    model.train()
    return x.clamp(-1, 1)


def save_plots(out: Path, losses: list[float], samples: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, alpha=0.3, label="loss")
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))]
    ax.plot(smooth, label=f"moving mean ({window})")
    ax.set(xlabel="step", ylabel="flow-matching loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    rows, cols = 10, samples.shape[0] // 10
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8))
    for i, ax in enumerate(axes.flat):
        ax.imshow(samples[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = method_options(args.method, args.option)
    images, labels = load_digits(args.size)
    config = {"input_size": args.size, "in_channels": 1, "hidden_size": args.hidden, "depth": args.depth,
              "num_heads": args.heads, "num_classes": 10}
    model = PixelDiT(**config, attention=args.method, attention_options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, len(images), (args.batch_size,))
        loss = flow_loss(model, images[batch], labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    train_seconds = time.perf_counter() - start

    samples = sample(model, torch.arange(10).repeat_interleave(8), args.size, args.sample_steps, args.cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"PixelDiT {args.size}x{args.size}, {args.method} {options or ''}".strip()
    save_plots(args.out, losses, samples, title)
    metrics = {
        "method": args.method, "options": {k: repr(v) for k, v in options.items()}, "steps": args.steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]), "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        weights = {name: t.half() for name, t in model.state_dict().items()}
        torch.save({"config": config, "method": args.method, "metrics": metrics, "state_dict": weights}, args.save)
        print(f"wrote {args.save}")
    print(f"wrote {args.out / 'loss.png'}, {args.out / 'samples.png'} and metrics.json")
    return metrics


if __name__ == "__main__":
    main()
