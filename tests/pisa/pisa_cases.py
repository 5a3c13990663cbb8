"""Inputs shared by the PISA tests of several backends."""

import torch


def late_centroid_case(num_blocks: int, block_size: int = 2, dim: int = 8, dtype=torch.float32):
    """Every query selects block 0; the last block's centroid has a logit over 3 above every earlier one, so the
    first-order sum z must be rescaled when it arrives (a kernel that forgets inflates z by over e^3)."""
    gen = torch.Generator().manual_seed(11)
    num_tokens = num_blocks * block_size
    u = torch.nn.functional.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
    q = u + 0.1 * torch.randn(1, 1, num_tokens, dim, generator=gen, dtype=torch.float64)
    k = 0.3 * torch.randn(1, 1, num_tokens, dim, generator=gen, dtype=torch.float64)
    k[:, :, -block_size:] = 6.0 * u + 0.3 * torch.randn(block_size, dim, generator=gen, dtype=torch.float64)
    # Values that follow the keys' deviations make H̄ (and so the first-order term) large.
    v = 3.0 * k + 0.5 * torch.randn(1, 1, num_tokens, dim, generator=gen, dtype=torch.float64)
    blocks = torch.zeros(1, 1, num_blocks, 1, dtype=torch.int64)
    logits = q @ k.reshape(1, 1, num_blocks, block_size, dim).mean(-2).transpose(-1, -2)  # scale 1
    assert bool((logits[..., -1] - logits[..., 1:-1].amax(-1) > 3).all())
    return (q.to(dtype), k.to(dtype), v.to(dtype)), blocks
