"""What ``difattn bench`` measures: cases (a method with options) on shapes (a grid with B, H, D).

Each case knows how to call its method, the work it must do (``needed_fraction``) and the work a backend's
kernels do (``computed_fraction``), both as fractions of dense attention's FLOPs (see :mod:`.work`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backends, functional, reference
from .._options import clear_radii, grat_group, pisa_num_selected
from ..grid import TokenGrid
from . import work


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: the token grid and batch, heads, head dim."""

    grid: TokenGrid
    batch: int = 1
    heads: int = 4
    head_dim: int = 64

    @property
    def label(self) -> str:
        g = self.grid
        frames = f"{g.frames}x" if g.frames > 1 else ""
        text = f"+{g.text_tokens}" if g.text_tokens else ""
        return f"{frames}{g.height}x{g.width}{text}"


@dataclass(frozen=True)
class Case:
    method: str
    options: dict = field(default_factory=dict)

    def call(self, q, k, v, extra, grid: TokenGrid, backend: str) -> torch.Tensor:
        return _CALLS[self.method](q, k, v, extra, grid, backend, self.options)

    def reference(self, q, k, v, extra, grid: TokenGrid) -> torch.Tensor:
        return _CALLS[self.method](q, k, v, extra, grid, "torch", self.options)

    def needed_fraction(self, shape: Shape, backward: bool = False) -> float:
        """Work the method must do, as a fraction of dense attention's in the same pass."""
        return _NEEDED[self.method](shape, self.options) * work.pass_factor(self.method, backward)

    def computed_fraction(self, shape: Shape, backend: str, backward: bool = False) -> float:
        """Work the backend's kernels do: whole blocks for the block engine, every lane of CLEAR's CPU tiles, the
        needed work otherwise."""
        pairs = backends.computed_pairs(self.method, backend, shape.grid, shape.head_dim, self.resolved_options(shape))
        if pairs is not None:
            return pairs / shape.grid.num_tokens**2
        return self.needed_fraction(shape, backward)

    def density(self, shape: Shape) -> float | None:
        if self.method != "pisa":
            return None
        num_blocks = -(-shape.grid.num_tokens // self.options["block_size"])
        return pisa_num_selected(self.options["density"], num_blocks) / num_blocks

    def mask_mod(self, grid: TokenGrid, device) -> Callable | None:
        """FlexAttention ``mask_mod`` of this case in raster order, or None when the method has no mask."""
        if self.method == "clear":
            mask = reference.clear_mask(grid, self.options["radius"], device=device) if grid.num_tokens <= 16384 else None
            return None if mask is None else (lambda b, h, qi, ki: mask[qi, ki])
        if self.method == "grat":
            group = grat_group(grid, self.options.get("group"))
            mask = reference.grat_mask(grid, group, self.options.get("pattern", "neighbors"), self.options.get("reach", 1),
                                       device=device) if grid.num_tokens <= 16384 else None
            return None if mask is None else (lambda b, h, qi, ki: mask[qi, ki])
        return None

    def resolved_options(self, shape: Shape) -> dict:
        """The options as the implementations receive them (CLEAR's radii, GRAT's group as ``(gt, gh, gw)``)."""
        if self.method == "clear":
            r, rt = clear_radii(shape.grid, self.options["radius"], self.options.get("temporal_radius"))
            return {"radius": r, "temporal_radius": rt}
        if self.method == "grat":
            return {"group": grat_group(shape.grid, self.options.get("group")),
                    "pattern": self.options.get("pattern", "neighbors"), "reach": self.options.get("reach", 1)}
        return dict(self.options)


def _dydila_call(q, k, v, extra, grid, backend, options):
    q_aux, k_aux, gamma, lam = extra[:4]
    return functional.dydila_attention(
        q, k, v, q_aux, k_aux, gamma_q=gamma, gamma_k=gamma, gamma_q_aux=gamma, gamma_k_aux=gamma,
        lambda_q=lam, lambda_k=lam, backend=backend, **options,
    )


_CALLS: dict[str, Callable] = {
    "clear": lambda q, k, v, e, g, b, o: functional.clear_attention(q, k, v, g, backend=b, **o),
    "grat": lambda q, k, v, e, g, b, o: functional.grat_attention(q, k, v, g, backend=b, **o),
    "pisa": lambda q, k, v, e, g, b, o: functional.pisa_attention(q, k, v, grid=g, backend=b, **o),
    "llsa": lambda q, k, v, e, g, b, o: functional.llsa_attention(q, k, v, grid=g, backend=b, **o),
    "linear": lambda q, k, v, e, g, b, o: functional.linear_attention(e[4], e[5], v, backend=b, **o),
    "dydila": _dydila_call,
}

_NEEDED: dict[str, Callable[[Shape, dict], float]] = {
    "clear": lambda s, o: work.clear_pairs(s.grid, o["radius"]) / s.grid.num_tokens**2,
    "grat": lambda s, o: work.grat_pairs(s.grid, o.get("group"), o.get("pattern", "neighbors"), o.get("reach", 1))
    / s.grid.num_tokens**2,
    "pisa": lambda s, o: work.pisa_fraction(s.grid.num_tokens, o["density"], o["block_size"]),
    "llsa": lambda s, o: work.llsa_fraction(s.grid.num_tokens, o["block_size"], o["topk"], o.get("levels")),
    "linear": lambda s, o: work.linear_fraction(s.grid.num_tokens, s.head_dim),
    "dydila": lambda s, o: work.dydila_fraction(s.grid.num_tokens, s.head_dim),
}

CASES = {
    "clear": (Case("clear", {"radius": 8.0}), Case("clear", {"radius": 16.0})),
    "grat": (Case("grat", {"group": (8, 8), "pattern": "neighbors", "reach": 1}),
             Case("grat", {"group": (16, 16), "pattern": "criss_cross"})),
    "pisa": tuple(Case("pisa", {"density": d, "block_size": 64}) for d in (0.125, 0.0625, 0.25)),
    "llsa": (Case("llsa", {"block_size": 16, "topk": 8}),),
    "linear": (Case("linear", {"normalize": True}),),
    "dydila": (Case("dydila", {"normalize": False}),),
}
QUICK_CASES = {method: cases[:1] for method, cases in CASES.items()}

# The quality sweep (``difattn bench --quality``) of each method's main knob, for grids of about 64x64 tokens.
# PISA's order="first" (per-block moments, memory-bound) has no kernel: the sweep runs it on the torch backend.
QUALITY_CASES = {
    "clear": tuple(Case("clear", {"radius": r}) for r in (2.0, 4.0, 8.0, 16.0, 32.0)),
    "grat": (*(Case("grat", {"group": (g, g), "pattern": "neighbors", "reach": 1}) for g in (4, 8, 16)),
             Case("grat", {"group": (8, 8), "pattern": "neighbors", "reach": 2}),
             *(Case("grat", {"group": (g, g), "pattern": "criss_cross"}) for g in (8, 16))),
    "pisa": (*(Case("pisa", {"density": d, "block_size": 64, "order": "hybrid"}) for d in (0.03125, 0.0625, 0.125, 0.25, 0.5)),
             *(Case("pisa", {"density": d, "block_size": 64, "order": "zeroth"}) for d in (0.0625, 0.125, 0.25)),
             Case("pisa", {"density": 0.125, "block_size": 64, "order": "first"})),
    "llsa": (*(Case("llsa", {"block_size": 16, "topk": k}) for k in (4, 8, 16, 32)),
             Case("llsa", {"block_size": 16, "topk": 8, "levels": 2})),
    "linear": CASES["linear"],
    "dydila": CASES["dydila"],
}
# The same knobs scaled to the small grids of captured patterns and end-to-end models (16x16 to 24x24 tokens);
# end to end, the first two settings of each method run, the first also with dense steps and layers.
SMALL_GRID_CASES = {
    "clear": tuple(Case("clear", {"radius": r}) for r in (4.0, 2.0, 8.0)),
    "grat": (Case("grat", {"group": (4, 4), "pattern": "neighbors", "reach": 1}),
             Case("grat", {"group": (2, 2), "pattern": "neighbors", "reach": 1}),
             Case("grat", {"group": (4, 4), "pattern": "criss_cross"})),
    "pisa": (*(Case("pisa", {"density": d, "block_size": 16, "order": "hybrid"}) for d in (0.25, 0.125, 0.5)),
             Case("pisa", {"density": 0.25, "block_size": 16, "order": "zeroth"})),
    "llsa": tuple(Case("llsa", {"block_size": 4, "topk": k}) for k in (8, 4, 16)),
    "linear": CASES["linear"],
    "dydila": CASES["dydila"],
}


_FUNCTIONS = {
    "clear": functional.clear_attention, "grat": functional.grat_attention, "pisa": functional.pisa_attention,
    "llsa": functional.llsa_attention, "linear": functional.linear_attention, "dydila": functional.dydila_attention,
}
# Keyword arguments the bench supplies itself (the grid, inputs and backend of each call), never a case option.
_SUPPLIED = {"grid", "backend", "scale", "global_kv", "text_mask", "return_blocks", "return_indices", "gamma_q",
             "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k"}


def option_names(method: str) -> tuple[str, ...]:
    """The options of ``method`` a case may set: its function's keyword-only arguments the bench does not supply."""
    params = inspect.signature(_FUNCTIONS[method]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _SUPPLIED)


def with_options(table: dict[str, tuple[Case, ...]], overrides: dict[str, dict]) -> dict[str, tuple[Case, ...]]:
    """``table`` with each method in ``overrides`` timed as one case: its first case's options updated with the
    given ones (``{"clear": {"radius": 12.0}}``). Raises ``ValueError`` naming an unknown method or option."""
    out = dict(table)
    for method, options in overrides.items():
        if method not in table:
            raise ValueError(f"--option: unknown method {method!r} (one of {', '.join(table)})")
        unknown = sorted(set(options) - set(option_names(method)))
        if unknown:
            names = ", ".join(option_names(method))
            raise ValueError(f"--option: {method} has no option {unknown[0]!r} (it has {names})")
        out[method] = (Case(method, {**table[method][0].options, **options}),)
    return out


def _grid(side: int, text: int = 0, frames: int = 1, width: int | None = None, position: str = "first") -> TokenGrid:
    return TokenGrid(side, width or side, frames=frames, text_tokens=text, text_position=position)


# DiT-realistic shapes per device. CPU: the 64x64 grid of the CPU targets (4 heads, D=64).
CPU_SHAPES = (Shape(_grid(64)),)
CPU_QUICK_SHAPES = (Shape(_grid(32)),)
# ``--plot`` on CPU without --grid/--tokens: a size sweep, so the plot shows how the speedup grows with N.
CPU_PLOT_SHAPES = (Shape(_grid(32)), Shape(_grid(48)), Shape(_grid(64)))
CPU_QUICK_PLOT_SHAPES = (Shape(_grid(16)), Shape(_grid(24)), Shape(_grid(32)))
# GPU: FLUX-like (24 heads x 128, 512 text first), Wan-like video (12 heads), pixel grids for LLSA (D=64).
GPU_SHAPES = (
    Shape(_grid(64, 512), heads=24, head_dim=128),
    Shape(_grid(128, 512), heads=24, head_dim=128),
    Shape(_grid(256, 512), heads=24, head_dim=128),
    Shape(_grid(30, 512, frames=21, width=52, position="last"), heads=12, head_dim=128),
    Shape(_grid(128), batch=16, heads=6, head_dim=64),
    Shape(_grid(256), batch=4, heads=6, head_dim=64),
)
GPU_QUICK_SHAPES = (Shape(_grid(64, 512), heads=24, head_dim=128),)


def shapes_for_tokens(tokens: list[int], heads: int, head_dim: int, batch: int) -> tuple[Shape, ...]:
    """Square image grids with about the requested token counts (``--tokens``)."""
    out = []
    for n in tokens:
        side = max(1, round(n**0.5))
        out.append(Shape(_grid(side), batch=batch, heads=heads, head_dim=head_dim))
    return tuple(out)
