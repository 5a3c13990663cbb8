"""Hypothesis strategies over DiT-realistic shapes (needs the ``test`` extra)."""

from __future__ import annotations

from hypothesis import strategies as st

from ..grid import TokenGrid

HEAD_DIMS = (64, 72, 96, 128)


@st.composite
def token_grids(
    draw,
    *,
    max_side: int = 24,
    max_frames: int = 3,
    max_text: int = 20,
    max_tokens: int = 640,
) -> TokenGrid:
    """Grids with odd and non-square sides, optional frames and text on either side, at most ``max_tokens``."""
    frames = draw(st.integers(1, max_frames))
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    text = draw(st.integers(0, max_text))
    position = draw(st.sampled_from(("first", "last")))
    grid = TokenGrid(height, width, frames=frames, text_tokens=text, text_position=position)
    if grid.num_tokens > max_tokens:
        # Shrink the frames first, then the sides, keeping the draw valid rather than filtering it away.
        frames = max(1, min(frames, max_tokens // max(1, height * width + text)))
        scale = (max(1, max_tokens - text) / (frames * height * width)) ** 0.5
        height = max(1, min(height, int(height * scale)))
        width = max(1, min(width, int(width * scale)))
        grid = TokenGrid(height, width, frames=frames, text_tokens=min(text, max_tokens // 4), text_position=position)
    return grid


def head_dims() -> st.SearchStrategy[int]:
    """The head dims DiTs use: 64, 72, 96, 128."""
    return st.sampled_from(HEAD_DIMS)


def float_dtypes(*, low_precision: bool = True):
    """fp32 and float64, plus fp16 (bf16 is left to GPU tiers and explicit tests)."""
    import torch

    choices = [torch.float32, torch.float64] + ([torch.float16] if low_precision else [])
    return st.sampled_from(choices)
