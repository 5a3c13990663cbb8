"""The six supported model families: where their attention layers are and how a call's geometry is read.

A family is found by the transformer's class name (no diffusers import is needed to describe it, so a
diffusers release without some model class still works for the others). Geometry comes from the transformer's
own forward arguments, read by a forward pre-hook on every call, never from a configured resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..grid import TokenGrid


@dataclass(frozen=True)
class Geometry:
    """The token layout of one transformer call: a ``frames x height x width`` latent grid and ``text_tokens``
    text tokens on the ``text_position`` side of it in the joint attention layers."""

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "first"

    def grid(self, num_tokens: int) -> TokenGrid:
        """The grid of a self-attention call over ``num_tokens`` tokens: the image alone, or image and text."""
        image = self.frames * self.height * self.width
        if num_tokens == image:
            return TokenGrid(self.height, self.width, self.frames)
        if num_tokens == image + self.text_tokens:
            return TokenGrid(self.height, self.width, self.frames, self.text_tokens, self.text_position)
        raise ValueError(
            f"an attention layer got N = {num_tokens} tokens, but this call of the transformer has {image} image "
            f"tokens ({self.frames}x{self.height}x{self.width}) and {self.text_tokens} text tokens"
        )


@dataclass(frozen=True)
class Family:
    """One model family.

    ``blocks``: ``(container, attention attributes)`` pairs in execution order; layers are listed block by
    block, and inside a block in the order of ``attention attributes`` (absent ones, e.g. SD3's ``attn2`` in
    blocks without dual attention, are skipped). ``geometry(transformer, arguments)`` reads the layout from
    the bound forward arguments.
    """

    name: str
    class_name: str
    blocks: tuple[tuple[str, tuple[str, ...]], ...]
    geometry: Callable[[nn.Module, dict[str, Any]], Geometry]

    def layers(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, attention module)`` of every layer difattn handles, in execution order."""
        found = []
        for container, attributes in self.blocks:
            for index, block in enumerate(getattr(transformer, container, None) or ()):
                for attribute in attributes:
                    module = getattr(block, attribute, None)
                    if module is not None:
                        found.append((f"{container}.{index}.{attribute}", module))
        return found


def _text_length(encoder_hidden_states: Any) -> int:
    return 0 if encoder_hidden_states is None else int(encoder_hidden_states.shape[1])


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _grid_from_ids(ids: torch.Tensor) -> tuple[int, int, int]:
    """``(frames, height, width)`` from FLUX position ids ``(N, 3)`` = (frame/index, row, column).

    The ids must be one or more equally sized raster grids (FLUX; Kontext's reference image is a second frame);
    anything else raises ``ValueError``.
    """
    if ids.ndim == 3:  # deprecated batched ids: every sample shares them
        ids = ids[0]
    ids = ids.detach().round().to(torch.int64)
    t = ids[:, 0]
    frames = int(torch.unique_consecutive(t).numel())
    n = ids.shape[0]
    if n % frames:
        raise ValueError(f"img_ids: {frames} frames of unequal size in {n} tokens do not form a grid")
    per_frame = ids.view(frames, n // frames, 3)
    rel = per_frame - per_frame.amin(dim=1, keepdim=True)
    height, width = int(rel[0, :, 1].max()) + 1, int(rel[0, :, 2].max()) + 1
    index = torch.arange(n // frames, device=ids.device)
    raster = torch.stack([torch.zeros_like(index), index // width, index % width], dim=1)
    if height * width != n // frames or not bool((rel == raster).all()):
        raise ValueError("img_ids: the image position ids are not a raster grid (rows, then columns)")
    return frames, height, width


def _flux(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    ids = a.get("img_ids")
    if ids is None:
        raise ValueError("FluxTransformer2DModel was called without img_ids, so the image grid is unknown")
    frames, height, width = _grid_from_ids(ids)
    return Geometry(frames, height, width, _text_length(a.get("encoder_hidden_states")), "first")


def _image_2d(text_position: str) -> Callable[[nn.Module, dict[str, Any]], Geometry]:
    """Patchified ``(B, C, H, W)`` inputs (SD3, DiT, PixArt); text joins SD3's joint layers on ``text_position``."""

    def geometry(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
        ph, pw = _pair(transformer.config.patch_size)
        height, width = a["hidden_states"].shape[-2:]
        return Geometry(1, height // ph, width // pw, _text_length(a.get("encoder_hidden_states")), text_position)

    return geometry


def _image_only_2d(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    ph, pw = _pair(transformer.config.patch_size)
    height, width = a["hidden_states"].shape[-2:]
    return Geometry(1, height // ph, width // pw)


def _wan(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    pt, ph, pw = transformer.config.patch_size
    frames, height, width = a["hidden_states"].shape[-3:]
    return Geometry(frames // pt, height // ph, width // pw)


def _hunyuan_video(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    p, pt = transformer.config.patch_size, transformer.config.patch_size_t
    frames, height, width = a["hidden_states"].shape[-3:]
    return Geometry(frames // pt, height // p, width // p, _text_length(a.get("encoder_hidden_states")), "last")


FAMILIES: tuple[Family, ...] = (
    Family(
        "flux", "FluxTransformer2DModel",
        (("transformer_blocks", ("attn",)), ("single_transformer_blocks", ("attn",))), _flux,
    ),
    Family("sd3", "SD3Transformer2DModel", (("transformer_blocks", ("attn", "attn2")),), _image_2d("last")),
    Family("dit", "DiTTransformer2DModel", (("transformer_blocks", ("attn1",)),), _image_only_2d),
    Family("pixart", "PixArtTransformer2DModel", (("transformer_blocks", ("attn1",)),), _image_only_2d),
    Family("wan", "WanTransformer3DModel", (("blocks", ("attn1",)),), _wan),
    Family(
        "hunyuan_video", "HunyuanVideoTransformer3DModel",
        (("transformer_blocks", ("attn",)), ("single_transformer_blocks", ("attn",))), _hunyuan_video,
    ),
)


def family_of(transformer: nn.Module) -> Family:
    """The family of ``transformer`` (its class or a base class by name); ``TypeError`` when unsupported."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for family in FAMILIES:
        if family.class_name in names:
            return family
    supported = ", ".join(f.class_name for f in FAMILIES)
    raise TypeError(f"transformer must be one of {supported} (or a subclass), got {type(transformer).__name__}")
