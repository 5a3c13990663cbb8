"""Shared pieces of the model-based quality checks: catching the q, k, v a model hands to dense attention, and a
rectified-flow Euler sampler.

Capture needs no hook inside the model: PixelDiT's dense attention and diffusers' native attention backend both
call ``torch.nn.functional.scaled_dot_product_attention`` with ``(B, H, N, D)`` tensors, and a
:class:`torch.overrides.TorchFunctionMode` sees every such call made while it is active.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class SDPACapture(TorchFunctionMode):
    """Inside ``with SDPACapture() as cap:``, every self-attention call of
    ``F.scaled_dot_product_attention`` (as many keys as queries, no mask, default scale) is recorded in
    ``cap.calls`` as detached ``(q, k, v)``, in call order, and still computed. Calls with other shapes (cross-
    attention), a mask or another scale are skipped and counted in ``cap.skipped``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.skipped = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            bound = dict(zip(names, args)) | kwargs
            q, k, v = bound["query"], bound["key"], bound["value"]
            plain = (bound.get("attn_mask") is None and not bound.get("is_causal", False)
                     and bound.get("scale") in (None, q.shape[-1] ** -0.5))
            if plain and q.dim() == 4 and q.shape[-2] == k.shape[-2]:
                self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
            else:
                self.skipped += 1
        return func(*args, **kwargs)

    def stacked(self, keep: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The recorded calls (all of the same shape) with their layers stacked along the head axis:
        ``(B, layers * H, N, D)`` each, batch rows ``keep`` only."""
        if not self.calls:
            raise RuntimeError("no self-attention call was captured (is the model's attention dense SDPA?)")
        return tuple(torch.cat([call[i][keep] for call in self.calls], dim=1) for i in range(3))  # type: ignore[return-value]


def euler_flow(velocity: Callable[[torch.Tensor, float, int], torch.Tensor], x: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t, step)`` from ``t = 1`` (noise) to ``t = 0`` (data) with ``steps`` equal
    Euler steps: the sampler of rectified-flow models (the digits PixelDiT, FLUX, SD3, Wan)."""
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        x = x + (t_next - t) * velocity(x, t, i)
    return x
