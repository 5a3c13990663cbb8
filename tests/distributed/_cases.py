"""Inputs and the sharded-vs-single-process comparison every distributed exactness test runs on each rank."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import difattn
import difattn.distributed as dd
from difattn.testing import assert_close

# Grids whose rows do not divide by 2, 3 or 4; text first, text last, none; one video.
GRIDS = {
    "7x6+5first": difattn.TokenGrid(7, 6, text_tokens=5, text_position="first"),
    "2x5x4+3last": difattn.TokenGrid(5, 4, frames=2, text_tokens=3, text_position="last"),
    "9x5": difattn.TokenGrid(9, 5),
}
PER_TOKEN = ("gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k")


@dataclass(frozen=True)
class Case:
    method: str
    scheme: str
    options: dict = field(default_factory=dict)
    # GRAT: pad the last text token of sample 0, as a (B, T) mask (True) or as per-sample text counts ("counts")
    text_mask: bool | str = False

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        mask = {False: "", True: ",text_mask", "counts": ",text_counts"}[self.text_mask]
        return f"{self.method}/{self.scheme}({opts}{mask})"


CASES = (
    Case("dense", "ulysses"),
    Case("clear", "halo", {"radius": 2.5}),
    Case("clear", "halo", {"radius": 4.0}),  # halo wider than a stripe at 3 and 4 ranks: rows from several ranks
    Case("clear", "ulysses", {"radius": 2.5}),
    Case("clear", "auto", {"radius": 1.5}),
    Case("grat", "halo", {"group": (2, 2), "reach": 1}),
    Case("grat", "halo", {"group": (3, 2), "reach": 1}, text_mask=True),
    Case("grat", "halo", {"group": (2, 2), "reach": 1}, text_mask="counts"),
    Case("grat", "ulysses", {"group": (2, 3), "pattern": "criss_cross"}, text_mask=True),
    Case("pisa", "ulysses", {"density": 0.5, "block_size": 4}),
    Case("llsa", "ulysses", {"block_size": 4, "topk": 2, "levels": 1}),
    Case("linear", "state", {"normalize": True}),
    Case("linear", "ulysses", {"normalize": False}),
    Case("dydila", "state", {"normalize": False}),
    Case("dydila", "ulysses", {"normalize": True}),
)


def full_inputs(case: Case, grid: difattn.TokenGrid, dtype: torch.dtype, *, B: int = 2, H: int = 4, D: int = 8,
                seed: int = 0) -> dict[str, torch.Tensor | float]:
    """The full tensors (the same on every rank: one seed), in ``dtype``; per-token values are ``(B, H, N)``."""
    gen = torch.Generator().manual_seed(seed)
    N = grid.num_tokens

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def uniform(low, high, *shape):
        return (low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    if case.method == "linear":  # non-negative features keep the normaliser away from zero
        x = {name: uniform(0.1, 1.0, B, H, N, D) for name in ("q", "k")} | {"v": randn(B, H, N, D)}
    else:
        x = {name: randn(B, H, N, D) for name in ("q", "k", "v")}
    if case.method == "dydila":
        x |= {"q_aux": randn(B, H, N, D), "k_aux": randn(B, H, N, D)}
        for name in PER_TOKEN:
            x[name] = uniform(1.0, 3.0, B, H, N) if name.startswith("gamma") else uniform(0.0, 0.3, B, H, N)
        x["gamma_k_aux"] = 2.0  # a float for every token, as the API allows
    return x


def single(case: Case, x: dict, grid: difattn.TokenGrid, backend: str, text_mask) -> torch.Tensor:
    """The single-process public call on the full tensors."""
    q, k, v = x["q"], x["k"], x["v"]
    opts = dict(case.options, backend=backend)
    if case.method == "dense":
        return F.scaled_dot_product_attention(q, k, v)
    if case.method == "clear":
        return difattn.clear_attention(q, k, v, grid, **opts)
    if case.method == "grat":
        return difattn.grat_attention(q, k, v, grid, text_mask=text_mask, **opts)
    if case.method == "pisa":
        return difattn.pisa_attention(q, k, v, grid=grid, **opts)
    if case.method == "llsa":
        return difattn.llsa_attention(q, k, v, grid=grid, **opts)
    if case.method == "linear":
        return difattn.linear_attention(q, k, v, **opts)
    tokens = {name: x[name] for name in PER_TOKEN}
    return difattn.dydila_attention(q, k, v, x["q_aux"], x["k_aux"], **tokens, **opts)


def sharded(case: Case, x_local: dict, grid: difattn.TokenGrid, backend: str, text_mask) -> torch.Tensor:
    opts = dict(case.options, backend=backend)
    if case.method == "dense":
        opts.pop("backend")
    if text_mask is not None:
        opts["text_mask"] = text_mask
    extra = {name: value for name, value in x_local.items() if name not in ("q", "k", "v")}
    return dd.attention(case.method, x_local["q"], x_local["k"], x_local["v"], grid, scheme=case.scheme, **opts,
                        **extra)


def _shard(name: str, value, grid):
    if not isinstance(value, torch.Tensor):
        return value
    return dd.shard(value, grid, dim=-1 if name in PER_TOKEN else -2)


def _text_mask(case: Case, grid: difattn.TokenGrid, B: int = 2):
    if not case.text_mask:
        return None
    if case.text_mask == "counts":
        return torch.tensor([grid.text_tokens - 1] + [grid.text_tokens] * (B - 1))
    mask = torch.ones(B, grid.text_tokens, dtype=torch.bool)
    mask[0, -1] = False
    return mask


def _run(fn, case, x, grid, backend, text_mask, dout):
    leaves = {n: t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for n, t in x.items()}
    out = fn(case, leaves, grid, backend, text_mask)
    tensors = {n: t for n, t in leaves.items() if isinstance(t, torch.Tensor)}
    grads = torch.autograd.grad(out, list(tensors.values()), dout)
    return out.detach(), dict(zip(tensors, grads))


def check(case: Case, grid_name: str, *, dtype: torch.dtype = torch.float64, backend: str = "torch") -> None:
    """Sharded forward and every input gradient against the single-process call (on this rank's shard).

    float64 with the torch backend: equal to round-off. Lower precision: through :func:`assert_close`, with the
    single-process call in the same precision and backend as the low-precision reference and the float64 torch
    call as the exact one (so the sharded run may be at most 2x (3x for gradients) as far from exact as the
    single-process run).
    """
    grid = GRIDS[grid_name]
    if case.method in ("grat",) and case.text_mask and not grid.text_tokens:
        return
    text_mask = _text_mask(case, grid)
    x64 = full_inputs(case, grid, torch.float64)
    gen = torch.Generator().manual_seed(1)
    dout64 = torch.randn(*x64["q"].shape[:3], x64["v"].shape[-1], generator=gen, dtype=torch.float64)
    high, high_grads = _run(single, case, x64, grid, "torch", text_mask, dout64)
    if dtype == torch.float64:
        low, low_grads = high, high_grads
    else:
        low, low_grads = _run(single, case, full_inputs(case, grid, dtype), grid, backend, text_mask, dout64.to(dtype))
    x_local = {name: _shard(name, value, grid) for name, value in full_inputs(case, grid, dtype).items()}
    out, grads = _run(sharded, case, x_local, grid, backend, text_mask, dd.shard(dout64.to(dtype), grid))
    label = f"{case.name} on {grid_name}"
    assert_close(f"{label} output", out, dd.shard(low, grid), dd.shard(high, grid))
    for name, grad in grads.items():
        ref_low, ref_high = (_shard(name, g[name], grid) for g in (low_grads, high_grads))
        assert_close(f"{label} grad of {name}", grad, ref_low, ref_high, gradient=True)
