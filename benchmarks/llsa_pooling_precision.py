"""How much LLSA's pooling precision matters in bf16: difattn pools q, k, v in fp32 (one rounding to bf16 at the
end), the authors' Triton ``mean_pool1d`` sums the children in the input dtype (a bf16 accumulator, one rounding per
addition). On random bf16 inputs this prints, per shape, the relative error (Frobenius) of the LLSA output against
the float64 reference on the same selection with either pyramid, the difference between the two outputs, and the
fraction of fine query blocks whose top-K blocks ``I_1`` come out the same when the selection pools in bf16.

Run: ``PYTHONPATH=python python benchmarks/llsa_pooling_precision.py`` (CPU, Rust kernels; a minute or two).
"""

from __future__ import annotations

import torch

import difattn
from difattn import reference
from difattn.ops.llsa import method as llsa_method
from difattn.ops.llsa import plan as llsa_plan
from difattn.testing import random_qkv, rel_error

SHAPES = [(4096, 16, (8,)), (4096, 16, (8, 8)), (4113, 16, (8, 8))]  # (N, block, topk): L = 1, 2, ragged L = 2


def bf16_pyramid(x: torch.Tensor, block_size: int, levels: int) -> list[torch.Tensor]:
    """The authors' pooling: each level the mean of its children, summed one child at a time in bf16."""
    out, level = [], x
    for _ in range(levels):
        n = level.shape[2]
        groups = -(-n // block_size)
        padded = torch.nn.functional.pad(level, (0, 0, 0, groups * block_size - n)).view(*level.shape[:2], groups,
                                                                                           block_size, -1)
        acc = torch.zeros_like(padded[:, :, :, 0])
        for child in range(block_size):
            acc = acc + padded[:, :, :, child]  # bf16 + bf16 -> bf16: rounded every step
        counts = torch.clamp(n - torch.arange(groups) * block_size, max=block_size).to(acc.dtype)
        level = acc / counts[:, None]
        out.append(level)
    return out


def measure(num_tokens: int, block_size: int, topks: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    q, k, v = random_qkv(1, 4, num_tokens, 64, dtype=torch.bfloat16, seed=seed)
    levels = len(topks)
    options = dict(block_size=block_size, topk=topks, levels=levels, scale=0.125)
    _, indices = reference.llsa_attention(*(x.double() for x in (q, k, v)), return_indices=True, **options)
    high = reference.llsa_attention(*(x.double() for x in (q, k, v)), indices=indices, **options)
    ours = difattn.llsa_attention(q, k, v, indices=indices, backend="rust", **options)
    layout = llsa_plan.Layout(num_tokens, block_size, topks)
    pooled_kv = tuple(torch.cat(bf16_pyramid(x, block_size, levels), dim=2) for x in (k, v))
    theirs = llsa_method.attend(q, k, v, indices, layout, scale=0.125, backend="rust", pooled_kv=pooled_kv)
    fp32_select = llsa_plan.select(*(llsa_plan.pyramid(x, block_size, levels, True) for x in (q, k)), layout)
    bf16_select = llsa_plan.select(*(bf16_pyramid(x, block_size, levels) for x in (q, k)), layout)
    same = (fp32_select[0].sort(-1).values == bf16_select[0].sort(-1).values).all(-1).float().mean()
    return {
        "fp32 pooling vs float64": rel_error(ours, high),
        "bf16 pooling vs float64": rel_error(theirs, high),
        "bf16 vs fp32 pooling": rel_error(theirs, ours),
        "same I_1 rows": float(same),
    }


if __name__ == "__main__":
    for num_tokens, block_size, topks in SHAPES:
        numbers = measure(num_tokens, block_size, topks)
        print(f"N={num_tokens} b={block_size} topk={topks}: " + ", ".join(f"{k} {v:.3g}" for k, v in numbers.items()))
