"""The grid-aware sparse methods as modules and processors call them.

One table from method name to its public function, the options a user may set on a module or processor, and
whether the method needs the token grid. :mod:`difattn.nn` and :mod:`difattn.diffusers` both go through
:func:`sparse_attention`, so a method behaves the same in a model and in a pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import functional
from .grid import TokenGrid


@dataclass(frozen=True)
class SparseMethod:
    """One row of the table.

    ``options``: keyword options of ``function`` a caller may set (the geometry, scale and return flags are
    supplied by the module or processor, never by the user). ``required``: options without a default.
    ``needs_grid``: True when the mask is defined on the grid (CLEAR, GRAT); PISA and LLSA use a grid when one
    is known (tiles / Z-order) and run in sequence order otherwise. ``text_mask``: accepts a text padding mask.
    """

    name: str
    function: Callable[..., torch.Tensor]
    options: frozenset[str]
    required: frozenset[str] = frozenset()
    needs_grid: bool = False
    text_mask: bool = False


SPARSE_METHODS: dict[str, SparseMethod] = {
    "clear": SparseMethod(
        "clear",
        functional.clear_attention,
        frozenset({"radius", "temporal_radius", "backend"}),
        required=frozenset({"radius"}),
        needs_grid=True,
    ),
    "grat": SparseMethod(
        "grat",
        functional.grat_attention,
        frozenset({"group", "pattern", "reach", "backend"}),
        needs_grid=True,
        text_mask=True,
    ),
    "pisa": SparseMethod(
        "pisa",
        functional.pisa_attention,
        frozenset({"density", "block_size", "order", "routing_bias", "sink", "backend"}),
    ),
    "llsa": SparseMethod(
        "llsa",
        functional.llsa_attention,
        frozenset({"block_size", "topk", "levels", "coarse_pooling", "token_weight", "backend"}),
    ),
}


def check_options(
    method: str, options: dict[str, Any], allowed: frozenset[str], required: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``options`` with every name in ``allowed`` and every name of ``required`` present; raises ``TypeError``."""
    unknown = sorted(set(options) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise TypeError(f"method {method!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}")
    missing = sorted(required - set(options))
    if missing:
        raise TypeError(f"method {method!r} needs option(s) {', '.join(missing)} (e.g. radius=8 for CLEAR)")
    return dict(options)


def square_grid(num_tokens: int, method: str) -> TokenGrid:
    """The square grid of ``num_tokens`` image tokens; ``ValueError`` when N is not a perfect square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"grid: method {method!r} needs the token grid and none was given; N = {num_tokens} tokens is not a "
            f"perfect square, so no square grid can be inferred: pass grid=difattn.TokenGrid(height, width, ...)"
        )
    return TokenGrid(side, side)


def sparse_attention(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: TokenGrid | None,
    options: dict[str, Any],
    scale: float | None = None,
    text_mask: torch.Tensor | None = None,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``method`` on ``(B, H, N, D)`` q, k, v; the output is ``(B, H, N, Dv)`` in q's dtype.

    ``grid`` must be given for CLEAR and GRAT (callers infer or look it up); ``text_mask`` ``(B, T)`` only for
    GRAT; ``global_kv`` only for CLEAR.
    """
    spec = SPARSE_METHODS[method]
    kwargs = dict(options, scale=scale)
    if spec.needs_grid:
        if grid is None:
            raise ValueError(f"grid: method {method!r} needs a TokenGrid")
        args: tuple = (q, k, v, grid)
    else:
        args = (q, k, v)
        kwargs["grid"] = grid
    if text_mask is not None:
        if not spec.text_mask:
            raise ValueError(f"text_mask: method {method!r} takes no text padding mask (only 'grat' does)")
        kwargs["text_mask"] = text_mask
    if global_kv is not None:
        kwargs["global_kv"] = global_kv
    return spec.function(*args, **kwargs)
