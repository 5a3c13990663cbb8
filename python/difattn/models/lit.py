"""LiT and DyDi-LiT: linear Diffusion Transformers.

LiT ("Delving into a Simplified Linear Diffusion Transformer", arXiv 2501.12976) is DiT with few heads and
ReLU linear attention plus a 5x5 depthwise conv on the values (:class:`difattn.nn.LiTAttention`); DyDi-LiT
(arXiv 2601.13683) swaps that attention for dynamic differential linear attention
(:class:`difattn.nn.DyDiLA`). Everything else is
:class:`~difattn.models.dit.DiT`, so both can inherit a DiT checkpoint (:func:`inherit_dit_weights`).
Heads per size (the papers' "few heads"): S 2, B 3, L 4, XL 4.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..nn import DyDiLA, LiTAttention
from .dit import DiT

_SIZES = {"S": (12, 384, 2), "B": (12, 768, 3), "L": (24, 1024, 4), "XL": (28, 1152, 4)}  # depth, width, heads


class LiT(DiT):
    """DiT with LiT's attention (:class:`difattn.nn.LiTAttention`: ReLU features, normalised linear attention,
    5x5 depthwise conv on V; options through ``attention_options``). Arguments as :class:`DiT`."""

    def __init__(self, *args: Any, attention: str | Callable[..., nn.Module] = LiTAttention, **kwargs: Any) -> None:
        super().__init__(*args, attention=attention, **kwargs)


class DyDiLiT(DiT):
    """DiT with DyDiLA attention (:class:`difattn.nn.DyDiLA`; options through ``attention_options``). Arguments as
    :class:`DiT`."""

    def __init__(self, *args: Any, attention: str | Callable[..., nn.Module] = DyDiLA, **kwargs: Any) -> None:
        super().__init__(*args, attention=attention, **kwargs)


def inherit_dit_weights(model: nn.Module, dit_state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every weight of a DiT checkpoint whose name and shape ``model`` shares (embedders, adaLN, MLPs,
    final layer, and the q/k/v/out projections, whose shapes do not depend on the head count).

    Returns the names of ``model``'s parameters and buffers left as they were (e.g. the depthwise conv, DyDiLA's
    banks and routers)."""
    own = model.state_dict()
    shared = {k: v for k, v in dit_state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return sorted(set(own) - set(shared))


def _factory(cls: type[DiT], size: str, patch: int) -> Callable[..., DiT]:
    depth, width, heads = _SIZES[size]

    def build(**kwargs: Any) -> DiT:
        return cls(depth=depth, hidden_size=width, patch_size=patch, num_heads=heads, **kwargs)

    build.__name__ = build.__qualname__ = f"{cls.__name__}_{size}_{patch}"
    build.__doc__ = f"{cls.__name__}-{size}/{patch}: depth {depth}, width {width}, {heads} heads, patch {patch}."
    return build


LiT_S_2, LiT_S_4, LiT_S_8 = (_factory(LiT, "S", p) for p in (2, 4, 8))
LiT_B_2, LiT_B_4, LiT_B_8 = (_factory(LiT, "B", p) for p in (2, 4, 8))
LiT_L_2, LiT_L_4, LiT_L_8 = (_factory(LiT, "L", p) for p in (2, 4, 8))
LiT_XL_2, LiT_XL_4, LiT_XL_8 = (_factory(LiT, "XL", p) for p in (2, 4, 8))
DyDiLiT_S_2, DyDiLiT_S_4, DyDiLiT_S_8 = (_factory(DyDiLiT, "S", p) for p in (2, 4, 8))
DyDiLiT_B_2, DyDiLiT_B_4, DyDiLiT_B_8 = (_factory(DyDiLiT, "B", p) for p in (2, 4, 8))
DyDiLiT_L_2, DyDiLiT_L_4, DyDiLiT_L_8 = (_factory(DyDiLiT, "L", p) for p in (2, 4, 8))
DyDiLiT_XL_2, DyDiLiT_XL_4, DyDiLiT_XL_8 = (_factory(DyDiLiT, "XL", p) for p in (2, 4, 8))

LiT_models = {
    f"LiT-{size}/{patch}": globals()[f"LiT_{size}_{patch}"] for size in _SIZES for patch in (2, 4, 8)
}
DyDiLiT_models = {
    f"DyDiLiT-{size}/{patch}": globals()[f"DyDiLiT_{size}_{patch}"] for size in _SIZES for patch in (2, 4, 8)
}
