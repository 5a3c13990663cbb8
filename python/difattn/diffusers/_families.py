"""The supported model families: where their attention layers are and how a call's geometry is read.

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
    text tokens on the ``text_position`` side of it in the joint attention layers.

    ``trimmed_text``: the model drops padded text tokens itself and runs attention per sample (Mochi), so a
    joint call may hold fewer than ``text_tokens`` text tokens.

    ``ids``: position ids ``(N, 3 or 4)`` the image grid is still to be read from (FLUX, Flux2, Chroma under
    ``torch.compile``, where the ids' values are unknown while tracing); ``frames``, ``height`` and ``width`` are
    then 0 until :meth:`resolved` reads them when the layer runs.
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "first"
    trimmed_text: bool = False
    ids: torch.Tensor | None = None

    def resolved(self) -> Geometry:
        """This geometry with the image grid read from ``ids`` (itself when there are none)."""
        if self.ids is None:
            return self
        frames, height, width = _grid_from_ids(self.ids)
        return Geometry(frames, height, width, self.text_tokens, self.text_position, self.trimmed_text)

    def grid(self, num_tokens: int) -> TokenGrid:
        """The grid of a self-attention call over ``num_tokens`` tokens: the image alone, or image and text."""
        image = self.frames * self.height * self.width
        text = num_tokens - image
        if text == 0:
            return TokenGrid(self.height, self.width, self.frames)
        if text == self.text_tokens or (self.trimmed_text and 0 < text < self.text_tokens):
            return TokenGrid(self.height, self.width, self.frames, text, self.text_position)
        raise ValueError(
            f"an attention layer got N = {num_tokens} tokens, but this call of the transformer has {image} image "
            f"tokens ({self.frames}x{self.height}x{self.width}) and {self.text_tokens} text tokens"
        )


Reader = Callable[[nn.Module, dict[str, Any]], Geometry]


@dataclass(frozen=True)
class Family:
    """One model family.

    ``class_names``: the transformer classes (or base classes) of the family. ``blocks``: ``(container,
    attention attributes)`` pairs in execution order; layers are listed block by block, and inside a block in
    the order of ``attention attributes`` (absent ones, e.g. SD3's ``attn2`` in blocks without dual attention,
    are skipped). ``geometry(transformer, arguments)`` reads the layout from the bound forward arguments.
    ``no_layers``: why a family has no layer difattn can replace (its ``blocks`` are empty).
    """

    name: str
    class_names: tuple[str, ...]
    blocks: tuple[tuple[str, tuple[str, ...]], ...]
    geometry: Reader | None
    no_layers: str = ""

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


def _text_length(*encoder_states: Any) -> int:
    """Text tokens of the joint layers: the summed lengths of the text streams given (None ones count 0)."""
    return sum(int(x.shape[1]) for x in encoder_states if x is not None)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _grid_from_ids(ids: torch.Tensor) -> tuple[int, int, int]:
    """``(frames, height, width)`` from position ids ``(N, 3 or 4)`` whose first columns are (frame/index, row,
    column) (FLUX, Chroma; Flux2 adds a fourth, constant, column).

    The ids must be one or more equally sized raster grids (FLUX; Kontext's reference image is a second frame);
    anything else raises ``ValueError``.
    """
    if ids.ndim == 3:  # deprecated batched ids: every sample shares them
        ids = ids[0]
    ids = ids[:, :3].detach().round().to(torch.int64)
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


def _from_ids(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    """FLUX, Flux2, Chroma: packed latents in raster order, their positions in ``img_ids``; text first."""
    ids = a.get("img_ids")
    if ids is None:
        name = type(transformer).__name__
        raise ValueError(f"{name} was called without img_ids, so the image grid is unknown")
    deferred = Geometry(0, 0, 0, _text_length(a.get("encoder_hidden_states")), "first", ids=ids)
    return deferred if torch.compiler.is_compiling() else deferred.resolved()


def _image_2d(text_position: str, extra_text: Callable[[nn.Module], int] = lambda t: 0) -> Reader:
    """Patchified ``(B, C, H, W)`` inputs (SD3, CogView4, AuraFlow, DiT, PixArt); text joins the joint layers on
    ``text_position``, with ``extra_text(transformer)`` more tokens (AuraFlow's registers)."""

    def geometry(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
        ph, pw = _pair(transformer.config.patch_size)
        height, width = a["hidden_states"].shape[-2:]
        text = _text_length(a.get("encoder_hidden_states"))
        return Geometry(1, height // ph, width // pw, text + extra_text(transformer) if text else 0, text_position)

    return geometry


def _video(
    patch: Callable[[Any], tuple[int, int, int]], text_position: str = "last", *, channels_first: bool = True,
    text: Callable[[dict[str, Any]], int] = lambda a: 0, trimmed_text: bool = False,
) -> Reader:
    """Patchified videos: ``(B, C, F, H, W)`` inputs (``(B, F, C, H, W)`` when not ``channels_first``),
    ``patch(config) = (pt, ph, pw)``, ``text(arguments)`` text tokens on ``text_position`` in joint layers."""

    def geometry(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
        pt, ph, pw = patch(transformer.config)
        x = a["hidden_states"]
        frames = x.shape[-3] if channels_first else x.shape[1]
        height, width = x.shape[-2:]
        return Geometry(frames // pt, height // ph, width // pw, text(a), text_position, trimmed_text)

    return geometry


def _hunyuan_image(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    """``(B, C, H, W)`` or ``(B, C, F, H, W)`` with a 2- or 3-entry ``patch_size``; image first, text last."""
    x, patch = a["hidden_states"], tuple(transformer.config.patch_size)
    sizes = [s // p for s, p in zip(x.shape[2:], patch)]
    frames, height, width = ([1] + sizes) if len(sizes) == 2 else sizes
    second = a.get("encoder_hidden_states_2") if getattr(transformer, "context_embedder_2", None) else None
    return Geometry(frames, height, width, _text_length(a.get("encoder_hidden_states"), second), "last")


def _qwen_image(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    """Packed latents of ``img_shapes``: per sample ``(frames, height, width)`` or a list of such pieces (edit
    models: the image, then reference images; layered models: the layers), which must share ``height x width``
    and become frames of one grid; text first."""
    shapes = a.get("img_shapes")
    if shapes is None:
        raise ValueError("QwenImageTransformer2DModel was called without img_shapes, so the image grid is unknown")
    pieces = {tuple(tuple(int(v) for v in s) for s in (p if isinstance(p[0], (tuple, list)) else [p])) for p in shapes}
    if len(pieces) != 1:
        raise ValueError(f"img_shapes: the samples of one call have different image shapes: {sorted(pieces)}")
    (piece,) = pieces
    if len({s[1:] for s in piece}) != 1:
        raise ValueError(f"img_shapes: images of different sizes {piece} do not form one grid")
    frames = sum(s[0] for s in piece)
    return Geometry(frames, piece[0][1], piece[0][2], _text_length(a.get("encoder_hidden_states")), "first")


def _ltx(transformer: nn.Module, a: dict[str, Any]) -> Geometry:
    """Packed video latents; the grid is the ``num_frames``, ``height``, ``width`` arguments (post-patch)."""
    sizes = [a.get(k) for k in ("num_frames", "height", "width")]
    if any(s is None for s in sizes):
        raise ValueError(f"{type(transformer).__name__} was called without num_frames, height and width")
    return Geometry(*(int(s) for s in sizes))


def _wan_patch(config: Any) -> tuple[int, int, int]:
    return tuple(config.patch_size)


def _hunyuan_patch(config: Any) -> tuple[int, int, int]:
    return config.patch_size_t, config.patch_size, config.patch_size


def _cogvideox_patch(config: Any) -> tuple[int, int, int]:
    return config.patch_size_t or 1, config.patch_size, config.patch_size


def _spatial_patch(config: Any) -> tuple[int, int, int]:
    return 1, config.patch_size, config.patch_size


def _allegro_patch(config: Any) -> tuple[int, int, int]:
    return config.patch_size_t, config.patch_size, config.patch_size


def _text(*keys: str) -> Callable[[dict[str, Any]], int]:
    return lambda a: _text_length(*(a.get(k) for k in keys))


_FLUX_BLOCKS = (("transformer_blocks", ("attn",)), ("single_transformer_blocks", ("attn",)))
_WAN = ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel")

FAMILIES: tuple[Family, ...] = (
    Family("flux", ("FluxTransformer2DModel",), _FLUX_BLOCKS, _from_ids),
    Family("flux2", ("Flux2Transformer2DModel",), _FLUX_BLOCKS, _from_ids),
    Family("chroma", ("ChromaTransformer2DModel",), _FLUX_BLOCKS, _from_ids),
    Family("sd3", ("SD3Transformer2DModel",), (("transformer_blocks", ("attn", "attn2")),), _image_2d("last")),
    Family("qwen_image", ("QwenImageTransformer2DModel",), (("transformer_blocks", ("attn",)),), _qwen_image),
    Family("cogview4", ("CogView4Transformer2DModel",), (("transformer_blocks", ("attn1",)),), _image_2d("first")),
    Family(
        "auraflow", ("AuraFlowTransformer2DModel",),
        (("joint_transformer_blocks", ("attn",)), ("single_transformer_blocks", ("attn",))),
        _image_2d("first", lambda t: int(t.register_tokens.shape[1])),
    ),
    Family("dit", ("DiTTransformer2DModel",), (("transformer_blocks", ("attn1",)),), _image_2d("first")),
    Family("pixart", ("PixArtTransformer2DModel",), (("transformer_blocks", ("attn1",)),), _image_2d("first")),
    Family("wan", _WAN, (("blocks", ("attn1",)),), _video(_wan_patch)),
    Family(
        "wan_vace", ("WanVACETransformer3DModel",), (("vace_blocks", ("attn1",)), ("blocks", ("attn1",))),
        _video(_wan_patch),
    ),
    Family("hunyuan_video", ("HunyuanVideoTransformer3DModel",), _FLUX_BLOCKS,
           _video(_hunyuan_patch, text=_text("encoder_hidden_states"))),
    Family(
        "hunyuan_video15", ("HunyuanVideo15Transformer3DModel",), (("transformer_blocks", ("attn",)),),
        _video(_hunyuan_patch, text=_text("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")),
    ),
    Family("hunyuan_image", ("HunyuanImageTransformer2DModel",), _FLUX_BLOCKS, _hunyuan_image),
    Family("ltx_video", ("LTXVideoTransformer3DModel",), (("transformer_blocks", ("attn1",)),), _ltx),
    Family(
        "cogvideox", ("CogVideoXTransformer3DModel",), (("transformer_blocks", ("attn1",)),),
        _video(_cogvideox_patch, "first", channels_first=False, text=_text("encoder_hidden_states")),
    ),
    Family(
        "mochi", ("MochiTransformer3DModel",), (("transformer_blocks", ("attn1",)),),
        _video(_spatial_patch, text=_text("encoder_hidden_states"), trimmed_text=True),
    ),
    Family("allegro", ("AllegroTransformer3DModel",), (("transformer_blocks", ("attn1",)),), _video(_allegro_patch)),
    Family(
        "sana", ("SanaTransformer2DModel",), (), None,
        no_layers="its self-attention layers are linear attention already and its other attention layers are "
        "cross-attention to the text; difattn leaves both as they are",
    ),
)


def family_of(transformer: nn.Module) -> Family:
    """The family of ``transformer`` (its class or a base class by name); ``TypeError`` when unsupported."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for family in FAMILIES:
        if names.intersection(family.class_names):
            return family
    supported = ", ".join(name for f in FAMILIES if f.blocks for name in f.class_names)
    raise TypeError(f"transformer must be one of {supported} (or a subclass), got {type(transformer).__name__}")
