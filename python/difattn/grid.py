"""Token geometry of a DiT sequence: text tokens on one side of an image or video latent grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_int

_TEXT_POSITIONS = ("first", "last")


@dataclass(frozen=True)
class TokenGrid:
    """The layout of a DiT token sequence.

    The sequence is ``[text][image]`` (``text_position="first"``, FLUX) or ``[image][text]``
    (``text_position="last"``, SD3, HunyuanVideo). Image tokens come in raster order ``(t, y, x)`` over a
    latent grid of ``frames x height x width``, as patchify produces them::

        num_tokens == text_tokens + frames * height * width

    Text tokens see every token and every token sees them; only image tokens are local. So any token that is not
    on the image grid belongs in ``text_tokens``: a ViT's class token and registers (timm's
    ``num_prefix_tokens``) are ``TokenGrid(14, 14, text_tokens=1)`` for ViT-B/16 at 224 px, first in the
    sequence; AuraFlow's register tokens count as text the same way.

    Args:
        height: latent rows (tokens), >= 1.
        width: latent columns (tokens), >= 1.
        frames: latent frames (video), >= 1.
        text_tokens: number of text tokens, >= 0.
        text_position: ``"first"`` or ``"last"``.
    """

    height: int
    width: int
    frames: int = 1
    text_tokens: int = 0
    text_position: str = "first"

    def __post_init__(self) -> None:
        check_int("height", self.height, minimum=1)
        check_int("width", self.width, minimum=1)
        check_int("frames", self.frames, minimum=1)
        check_int("text_tokens", self.text_tokens, minimum=0)
        if not isinstance(self.text_position, str) or self.text_position not in _TEXT_POSITIONS:
            raise ValueError(f"text_position must be 'first' or 'last', got {self.text_position!r}")

    @property
    def image_tokens(self) -> int:
        """Number of image tokens, ``frames * height * width``."""
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """Sequence length N."""
        return self.image_tokens + self.text_tokens

    @property
    def image_range(self) -> range:
        """Sequence indices of the image tokens."""
        start = self.text_tokens if self.text_position == "first" else 0
        return range(start, start + self.image_tokens)

    @property
    def text_range(self) -> range:
        """Sequence indices of the text tokens (empty without text)."""
        start = 0 if self.text_position == "first" else self.image_tokens
        return range(start, start + self.text_tokens)

    def is_text(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(N,)`` bool: True at text tokens."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool, device=device)
        mask[self.text_range.start : self.text_range.stop] = True
        return mask

    def image_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(frames*height*width, 3)`` int64 ``(t, y, x)`` of the image tokens in sequence order."""
        t, y, x = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.height, device=device),
            torch.arange(self.width, device=device),
            indexing="ij",
        )
        return torch.stack([t.reshape(-1), y.reshape(-1), x.reshape(-1)], dim=1)

    def coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(N, 3)`` int64 ``(t, y, x)`` per token of the sequence; text tokens get ``(-1, -1, -1)``."""
        out = torch.full((self.num_tokens, 3), -1, dtype=torch.int64, device=device)
        out[self.image_range.start : self.image_range.stop] = self.image_coords(device)
        return out

    def core_args(self) -> tuple[int, int, int, int, str]:
        """The grid as the compiled core takes it: ``(frames, height, width, text_tokens, text_position)``."""
        return (self.frames, self.height, self.width, self.text_tokens, self.text_position)


def check_grid(grid: Any, num_tokens: int, *, name: str = "grid") -> None:
    """``grid`` is a ``TokenGrid`` describing exactly ``num_tokens`` tokens."""
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"{name} must be a difattn.TokenGrid, got {type(grid).__name__}")
    if grid.num_tokens != num_tokens:
        raise ValueError(
            f"{name} describes {grid.num_tokens} tokens ({grid.text_tokens} text + {grid.frames}x{grid.height}"
            f"x{grid.width} image) but q, k, v have N = {num_tokens}"
        )
