"""PixelDiT: the pixel-space DiT of the LLSA paper ("Trainable Log-linear Sparse Attention for Efficient
Diffusion Transformers", Zhou et al.): a DiT on raw pixels (patch 1, so one token per pixel), with 2-D RoPE in
place of the absolute embedding and RMS-normalised queries and keys, trained with LLSA by default.

Everything else is :class:`~difattn.models.dit.DiT`; the defaults below are what make it the paper's model.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .dit import DiT, choose_attention


class PixelDiT(DiT):
    """A DiT on pixels: ``patch_size=1``, ``pos_embed="rope"``, ``qk_norm="rms_norm"``, ``attention="llsa"``
    (``block_size=16, topk=8``), flow-matching output (``learn_sigma=False``). Any DiT argument may be
    overridden (``method="clear", radius=4`` as well as ``attention=``/``attention_options=``); ``input_size`` may
    be ``(height, width)``."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 64,
        patch_size: int = 1,
        in_channels: int = 3,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        *,
        attention: str | Callable[..., nn.Module] = "llsa",
        attention_options: dict[str, Any] | None = None,
        qk_norm: bool | str = "rms_norm",
        pos_embed: str = "rope",
        process_group: Any = None,
        method: str | None = None,
        **method_options: Any,
    ) -> None:
        attention, attention_options = choose_attention(attention, attention_options, method, method_options)
        if attention == "llsa" and attention_options is None:
            attention_options = {"block_size": 16, "topk": 8}
        super().__init__(
            input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
            num_classes, learn_sigma, attention=attention, attention_options=attention_options, qk_norm=qk_norm,
            pos_embed=pos_embed, process_group=process_group,
        )


def PixelDiT_S(**kwargs: Any) -> PixelDiT:
    """PixelDiT-S: depth 12, width 384, 6 heads, on pixels (patch 1); ``kwargs`` go to
    :class:`PixelDiT`."""
    return PixelDiT(depth=12, hidden_size=384, num_heads=6, **kwargs)


def PixelDiT_B(**kwargs: Any) -> PixelDiT:
    """PixelDiT-B: depth 12, width 768, 12 heads, on pixels (patch 1); ``kwargs`` go to
    :class:`PixelDiT`."""
    return PixelDiT(depth=12, hidden_size=768, num_heads=12, **kwargs)


def PixelDiT_L(**kwargs: Any) -> PixelDiT:
    """PixelDiT-L: depth 24, width 1024, 16 heads, on pixels (patch 1); ``kwargs`` go to
    :class:`PixelDiT`."""
    return PixelDiT(depth=24, hidden_size=1024, num_heads=16, **kwargs)


def PixelDiT_XL(**kwargs: Any) -> PixelDiT:
    """PixelDiT-XL: depth 28, width 1152, 16 heads, on pixels (patch 1); ``kwargs`` go to
    :class:`PixelDiT`."""
    return PixelDiT(depth=28, hidden_size=1152, num_heads=16, **kwargs)


PixelDiT_models = {
    "PixelDiT-S": PixelDiT_S, "PixelDiT-B": PixelDiT_B, "PixelDiT-L": PixelDiT_L, "PixelDiT-XL": PixelDiT_XL,
}
