"""Which tokens of the full sequence each rank holds.

difattn's own layout (:meth:`Layout.stripes`): rank ``r`` owns a contiguous stripe of image rows ``[y0, y1)`` of
every frame (frames kept whole) and a contiguous run ``[t0, t1)`` of the text tokens. Rows and text are split as
``torch.tensor_split`` splits them: the first ``n % P`` ranks get one more. Locally the tokens keep the grid's
order: ``[text run][stripe]`` for ``text_position="first"``, ``[stripe][text run]`` for ``"last"``, the stripe in
raster order ``(t, y, x)``; so each rank's shard is itself the sequence of a :class:`~difattn.TokenGrid`
(:meth:`Layout.local_grid`). Splitting the text as well keeps every token on exactly one rank: nothing is computed
twice, and parameter gradients are partial sums that add up over the group.

Two other layouts: :meth:`Layout.sequence` (no grid: contiguous runs of the sequence) and :meth:`Layout.chunks`
(diffusers' context parallelism: contiguous runs of the text and of the raster-ordered image tokens, which are
row stripes only for single-frame grids whose runs end on row boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grid import TokenGrid

Span = tuple[int, int]


def balanced(total: int, parts: int) -> tuple[Span, ...]:
    """``[start, stop)`` of each of ``parts`` runs of ``total`` items, split as ``torch.tensor_split`` does."""
    base, extra = divmod(total, parts)
    spans, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        spans.append((start, stop))
        start = stop
    return tuple(spans)


@dataclass(frozen=True)
class Layout:
    """The token placement over ``world`` ranks.

    ``text[r]``: the run of text tokens (indices into the text) on rank r. ``rows[r]``: the image rows of every
    frame on rank r (stripe layouts), else None and ``image[r]`` is a run of raster-ordered image tokens. Without a
    grid (``grid is None``) the whole sequence counts as text: ``text[r]`` is the run of the sequence on rank r.
    """

    grid: TokenGrid | None
    world: int
    text: tuple[Span, ...]
    rows: tuple[Span, ...] | None = None
    image: tuple[Span, ...] | None = None

    @classmethod
    def stripes(cls, grid: TokenGrid, world: int) -> "Layout":
        if grid.height < world:
            raise ValueError(
                f"grid: the image has {grid.height} rows, fewer than the {world} ranks of the process group; every "
                "rank needs at least one row of the stripe layout"
            )
        return cls(grid, world, balanced(grid.text_tokens, world), rows=balanced(grid.height, world))

    @classmethod
    def sequence(cls, num_tokens: int, world: int) -> "Layout":
        return cls(None, world, balanced(num_tokens, world))

    @classmethod
    def chunks(cls, grid: TokenGrid, world: int) -> "Layout":
        """Balanced runs of the text and of the raster image tokens (diffusers' split); stripes where they coincide."""
        text, image = balanced(grid.text_tokens, world), balanced(grid.image_tokens, world)
        row_aligned = grid.frames == 1 and all(a % grid.width == 0 and a < b for a, b in image)
        if row_aligned:
            return cls(grid, world, text, rows=tuple((a // grid.width, b // grid.width) for a, b in image))
        return cls(grid, world, text, image=image)

    @property
    def num_tokens(self) -> int:
        return self.text[-1][1] if self.grid is None else self.grid.num_tokens

    def count(self, rank: int) -> int:
        """Tokens on ``rank``."""
        t0, t1 = self.text[rank]
        if self.grid is None:
            return t1 - t0
        if self.rows is not None:
            y0, y1 = self.rows[rank]
            return t1 - t0 + self.grid.frames * (y1 - y0) * self.grid.width
        i0, i1 = self.image[rank]
        return t1 - t0 + i1 - i0

    def text_first(self) -> bool:
        return self.grid is None or self.grid.text_position == "first"

    def local_grid(self, rank: int) -> TokenGrid:
        """The grid of rank's shard (stripe layouts only): its rows, all frames and columns, its text run."""
        (t0, t1), (y0, y1) = self.text[rank], self.rows[rank]
        g = self.grid
        return TokenGrid(y1 - y0, g.width, g.frames, t1 - t0, g.text_position)

    def indices(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(count(rank),)`` int64: positions in the full sequence of rank's tokens, in local order."""
        t0, t1 = self.text[rank]
        if self.grid is None:
            return torch.arange(t0, t1, device=device)
        g = self.grid
        text = torch.arange(t0, t1, device=device) + g.text_range.start
        if self.rows is not None:
            y0, y1 = self.rows[rank]
            frame = torch.arange(g.frames, device=device)[:, None] * (g.height * g.width)
            stripe = torch.arange(y0 * g.width, y1 * g.width, device=device)[None, :]
            image = (frame + stripe).reshape(-1)
        else:
            image = torch.arange(*self.image[rank], device=device)
        image = image + g.image_range.start
        return torch.cat((text, image) if self.text_first() else (image, text))

    def local_split(self, rank: int) -> tuple[int, int]:
        """``(text, image)`` token counts of rank's shard, in the order they sit locally."""
        t0, t1 = self.text[rank]
        return t1 - t0, self.count(rank) - (t1 - t0)

    def to_full(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(num_tokens,)`` int64: where each position of the full sequence sits in the concatenation of every
        rank's shard in rank order (index a concatenation with it to get the full sequence)."""
        return torch.cat([self.indices(r, device) for r in range(self.world)]).argsort()
