"""What ``difattn bench`` measures: one case per method with its options and the work it must do.

``work_fraction`` is the method's necessary FLOPs as a fraction of dense attention's ``4·B·H·N²·D``
(forward; the backward is modelled as 2.5x its forward for every method, as for dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import functional, reference
from .._options import grat_group, llsa_config, llsa_level_sizes, pisa_num_selected
from ..grid import TokenGrid

MASK_COUNT_LIMIT = 16384  # above this many tokens, masks are not built to count pairs


@dataclass(frozen=True)
class Case:
    method: str
    options: dict = field(default_factory=dict)

    def call(self, q, k, v, extra, grid: TokenGrid, backend: str) -> torch.Tensor:
        return _CALLS[self.method](q, k, v, extra, grid, backend, self.options)

    def work_fraction(self, grid: TokenGrid, head_dim_v: int) -> float | None:
        return _WORK[self.method](grid, head_dim_v, self.options)

    def density(self, grid: TokenGrid) -> float | None:
        if self.method == "pisa":
            num_blocks = -(-grid.num_tokens // self.options["block_size"])
            return pisa_num_selected(self.options["density"], num_blocks) / num_blocks
        return None


def _dydila_call(q, k, v, extra, grid, backend, options):
    q_aux, k_aux, gamma, lam = extra
    return functional.dydila_attention(
        q, k, v, q_aux, k_aux, gamma_q=gamma, gamma_k=gamma, gamma_q_aux=gamma, gamma_k_aux=gamma,
        lambda_q=lam, lambda_k=lam, backend=backend, **options,
    )


_CALLS: dict[str, Callable] = {
    "clear": lambda q, k, v, e, g, b, o: functional.clear_attention(q, k, v, g, backend=b, **o),
    "grat": lambda q, k, v, e, g, b, o: functional.grat_attention(q, k, v, g, backend=b, **o),
    "pisa": lambda q, k, v, e, g, b, o: functional.pisa_attention(q, k, v, grid=g, backend=b, **o),
    "llsa": lambda q, k, v, e, g, b, o: functional.llsa_attention(q, k, v, grid=g, backend=b, **o),
    "linear": lambda q, k, v, e, g, b, o: functional.linear_attention(q.relu(), k.relu(), v, backend=b, **o),
    "dydila": _dydila_call,
}


def _mask_fraction(mask_fn: Callable[[], torch.Tensor], num_tokens: int) -> float | None:
    if num_tokens > MASK_COUNT_LIMIT:
        return None
    return float(mask_fn().sum()) / num_tokens**2


def _pisa_work(grid: TokenGrid, head_dim_v: int, options: dict) -> float:
    n, b = grid.num_tokens, options["block_size"]
    num_blocks = -(-n // b)
    k = pisa_num_selected(options["density"], num_blocks)
    return min(1.0, (k * b + (num_blocks - k)) / n)


def _llsa_work(grid: TokenGrid, head_dim_v: int, options: dict) -> float:
    n, b = grid.num_tokens, options["block_size"]
    levels, ks = llsa_config(n, b, options["topk"], options.get("levels"))
    keys = ks[0] * b + sum(ks[l] * b for l in range(1, levels)) + llsa_level_sizes(n, b, levels)[levels]
    return min(1.0, keys / n)


_WORK: dict[str, Callable] = {
    "clear": lambda g, dv, o: _mask_fraction(lambda: reference.clear_mask(g, o["radius"]), g.num_tokens),
    "grat": lambda g, dv, o: _mask_fraction(
        lambda: reference.grat_mask(g, grat_group(g, o.get("group")), o.get("pattern", "neighbors"), o.get("reach", 1)), g.num_tokens
    ),
    "pisa": _pisa_work,
    "llsa": _llsa_work,
    "linear": lambda g, dv, o: dv / g.num_tokens,
    "dydila": lambda g, dv, o: dv / g.num_tokens,
}

DEFAULT_CASES = (
    Case("clear", {"radius": 8.0}),
    Case("grat", {"group": (8, 8), "pattern": "neighbors", "reach": 1}),
    Case("pisa", {"density": 0.125, "block_size": 64}),
    Case("llsa", {"block_size": 16, "topk": 8}),
    Case("linear", {"normalize": True}),
    Case("dydila", {"normalize": False}),
)
