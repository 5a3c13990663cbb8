"""``difattn bench --block``: one DiT block end to end (adaLN modulation, LayerNorms, the attention layer with its
qkv and output projections, the MLP), with each method's attention against dense SDPA's, forward and
forward+backward, so a user sees what a method gains in a model and not only in the attention op.

The block is DiT-XL/2's (Peebles & Xie, "Scalable Diffusion Models with Transformers": width 1152, 16 heads of
72 channels, MLP ratio 4) on a latent grid (64x64 by default: a 512x512 image through the /8 VAE and patch 2).
Each method runs with the options of its first benchmark case (:data:`.cases.CASES`); every block is built from
the same seed and gets the same inputs.

JSON: ``{"device", "cpu", "torch", ..., "records": [record, ...]}`` (the header of :func:`.runner.environment`);
a record is ``{"method", "options", "pass" ("fwd" | "fwd+bwd"), "B", "N", "grid", "hidden", "heads", "D",
"dtype", "ms", "ms_min", "ms_max", "dense_ms", "speedup"}`` with ``speedup = dense_ms / ms`` (both the block's
time, dense being the same block with SDPA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grid import TokenGrid
from ..models.dit import DiTBlock
from .cases import CASES
from .progress import Progress
from .timing import time_call

# DiT-XL/2
HIDDEN = 1152
HEADS = 16
DEFAULT_GRID = TokenGrid(64, 64)


@dataclass(frozen=True)
class BlockConfig:
    device: torch.device
    grid: TokenGrid = DEFAULT_GRID
    batch: int = 1
    dtype: torch.dtype = torch.float32
    methods: tuple[str, ...] = tuple(CASES)
    hidden: int = HIDDEN
    heads: int = HEADS
    budget_s: float = 1.0


def _block(cfg: BlockConfig, method: str, options: dict) -> DiTBlock:
    torch.manual_seed(0)
    block = DiTBlock(cfg.hidden, cfg.heads, attention=method, attention_options=options)
    return block.to(device=cfg.device, dtype=cfg.dtype)


def _time(cfg: BlockConfig, block: DiTBlock, x: torch.Tensor, c: torch.Tensor, backward: bool):
    params = [p for p in block.parameters() if p.requires_grad]
    grad_out = torch.ones_like(x)

    def call(_: int):
        if not backward:
            with torch.no_grad():
                return block(x, c, cfg.grid)
        x.grad = None
        for p in params:
            p.grad = None
        out = block(x, c, cfg.grid)
        out.backward(grad_out)
        return out

    # A block call takes from tens of ms to seconds on CPU: three timed repeats keep the default run short.
    return time_call(call, cfg.device, min_repeats=3, max_repeats=10, budget_s=cfg.budget_s)


def run_block(cfg: BlockConfig) -> list[dict]:
    """Times the dense block and one block per method, forward and forward+backward; returns the records."""
    cases = [("dense", {})] + [(m, dict(CASES[m][0].options)) for m in cfg.methods]
    progress = Progress(2 * len(cases))
    gen = torch.Generator().manual_seed(0)
    n = cfg.grid.num_tokens
    x = torch.randn(cfg.batch, n, cfg.hidden, generator=gen).to(device=cfg.device, dtype=cfg.dtype)
    c = torch.randn(cfg.batch, cfg.hidden, generator=gen).to(device=cfg.device, dtype=cfg.dtype)
    records = []
    for pass_name in ("fwd", "fwd+bwd"):
        backward = pass_name == "fwd+bwd"
        xin = x.clone().requires_grad_(backward)
        dense_ms = None
        for method, options in cases:
            progress.update(f"block {method} {pass_name}")
            timing = _time(cfg, _block(cfg, method, options), xin, c, backward)
            if method == "dense":
                dense_ms = timing.typical
            f, h, w, t, _ = cfg.grid.core_args()
            records.append({
                "method": method, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                "pass": pass_name, "B": cfg.batch, "N": n, "grid": [f, h, w, t], "hidden": cfg.hidden,
                "heads": cfg.heads, "D": cfg.hidden // cfg.heads, "dtype": str(cfg.dtype).removeprefix("torch."),
                "ms": timing.typical, "ms_min": timing.minimum, "ms_max": timing.maximum, "dense_ms": dense_ms,
                "speedup": dense_ms / timing.typical,
            })
            progress.step()
    progress.close()
    return records


def format_block_table(records: list[dict]) -> str:
    head = f"{'method':<7} {'pass':<7} {'options':<40} {'ms':>10} {'dense ms':>10} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"{r['method']:<7} {r['pass']:<7} {options:<40} {r['ms']:>10.1f} {r['dense_ms']:>10.1f} "
                     f"{r['speedup']:>7.2f}x")
    return "\n".join(lines)
