"""Hypothesis strategies over DiT-realistic shapes (needs the ``test`` extra)."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from ..grid import TokenGrid

HEAD_DIMS = (64, 72, 96, 128)
LIT_HEAD_DIMS = (192, 288)


@st.composite
def token_grids(
    draw,
    *,
    max_side: int = 24,
    max_frames: int = 3,
    max_text: int = 20,
    max_tokens: int = 640,
) -> TokenGrid:
    """Grids with odd and non-square sides, optional frames and text on either side, at most ``max_tokens``.

    Half the draws keep the text short (at most 20 tokens); the others take up to ``max_text`` (FLUX has 512 text
    tokens, several blocks of every kernel), shrinking the image rather than the text to fit ``max_tokens``.
    """
    frames = draw(st.integers(1, max_frames))
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    long_text = min(max_text, max_tokens - 1)
    text = draw(st.integers(0, min(long_text, 20)) | st.integers(0, long_text))
    position = draw(st.sampled_from(("first", "last")))
    if text + frames * height * width > max_tokens:
        # Shrink the frames first, then the sides, keeping the draw valid rather than filtering it away.
        room = max_tokens - text
        frames = max(1, min(frames, room // (height * width)))
        scale = (room / (frames * height * width)) ** 0.5
        height = max(1, min(height, int(height * scale), room))
        width = max(1, min(width, room // (frames * height)))
    return TokenGrid(height, width, frames=frames, text_tokens=text, text_position=position)


def head_dims() -> st.SearchStrategy[int]:
    """The head dims DiTs use: 64, 72, 96, 128."""
    return st.sampled_from(HEAD_DIMS)


def linear_head_dims() -> st.SearchStrategy[int]:
    """The DiT head dims plus LiT's few-head widths: 1152 / 4 = 288 and 384 / 2 = 192 (linear attention, DyDiLA)."""
    return st.sampled_from(HEAD_DIMS + LIT_HEAD_DIMS)


def disc_radii(max_radius: float = 8.0) -> st.SearchStrategy[float]:
    """CLEAR radii up to ``max_radius``, drawing the boundaries on purpose: integers (the strict ``dy² + dx² < r²``
    drops the offsets at distance exactly r), square roots of sums of two squares (r² lands within rounding of an
    offset's d², above it for √2, √5, √8, below for √13: the offset stays in or drops out by one ulp), an integer
    plus 0.05 (the disc's widest row is a single cell) and any float."""
    whole = int(max_radius)
    sums = sorted({a * a + b * b for a in range(whole + 1) for b in range(whole + 1)} - {0})
    return st.one_of(
        st.integers(1, whole).map(float),
        st.sampled_from([math.sqrt(k) for k in sums if k <= max_radius**2]),
        st.integers(1, max(1, int(max_radius - 0.05))).map(lambda r: r + 0.05),
        st.floats(0.3, max_radius),
    )


def float_dtypes(*, low_precision: bool = True):
    """fp32 and float64, plus fp16 (bf16 is left to GPU tiers and explicit tests)."""
    import torch

    choices = [torch.float32, torch.float64] + ([torch.float16] if low_precision else [])
    return st.sampled_from(choices)
