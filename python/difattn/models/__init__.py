"""Diffusion Transformers built on difattn's attention: DiT (the original architecture, attention injected),
PixelDiT (LLSA's pixel-space DiT), LiT and DyDi-LiT (linear DiTs). One readable file per model family.

``MODELS`` maps every configuration name (``"DiT-XL/2"``, ``"PixelDiT-S"``, ``"LiT-S/2"``, ``"DyDiLiT-XL/2"``,
...) to its factory; factories take the model's keyword arguments (``attention=``, ``attention_options=``,
``input_size=``, ...).
"""

from .dit import (
    DiT,
    DiT_B_2,
    DiT_B_4,
    DiT_B_8,
    DiT_L_2,
    DiT_L_4,
    DiT_L_8,
    DiT_models,
    DiT_S_2,
    DiT_S_4,
    DiT_S_8,
    DiT_XL_2,
    DiT_XL_4,
    DiT_XL_8,
    sincos_pos_embed_2d,
)
from .lit import (
    DyDiLiT,
    DyDiLiT_B_2,
    DyDiLiT_B_4,
    DyDiLiT_B_8,
    DyDiLiT_L_2,
    DyDiLiT_L_4,
    DyDiLiT_L_8,
    DyDiLiT_models,
    DyDiLiT_S_2,
    DyDiLiT_S_4,
    DyDiLiT_S_8,
    DyDiLiT_XL_2,
    DyDiLiT_XL_4,
    DyDiLiT_XL_8,
    LiT,
    LiT_B_2,
    LiT_B_4,
    LiT_B_8,
    LiT_L_2,
    LiT_L_4,
    LiT_L_8,
    LiT_models,
    LiT_S_2,
    LiT_S_4,
    LiT_S_8,
    LiT_XL_2,
    LiT_XL_4,
    LiT_XL_8,
    inherit_dit_weights,
)
from .pixel_dit import PixelDiT, PixelDiT_B, PixelDiT_L, PixelDiT_models, PixelDiT_S, PixelDiT_XL

MODELS = {**DiT_models, **PixelDiT_models, **LiT_models, **DyDiLiT_models}

__all__ = [
    "MODELS",
    "DiT", "DiT_models", "sincos_pos_embed_2d",
    "DiT_XL_2", "DiT_XL_4", "DiT_XL_8", "DiT_L_2", "DiT_L_4", "DiT_L_8",
    "DiT_B_2", "DiT_B_4", "DiT_B_8", "DiT_S_2", "DiT_S_4", "DiT_S_8",
    "PixelDiT", "PixelDiT_models", "PixelDiT_S", "PixelDiT_B", "PixelDiT_L", "PixelDiT_XL",
    "LiT", "LiT_models", "DyDiLiT", "DyDiLiT_models", "inherit_dit_weights",
    "LiT_S_2", "LiT_S_4", "LiT_S_8", "LiT_B_2", "LiT_B_4", "LiT_B_8",
    "LiT_L_2", "LiT_L_4", "LiT_L_8", "LiT_XL_2", "LiT_XL_4", "LiT_XL_8",
    "DyDiLiT_S_2", "DyDiLiT_S_4", "DyDiLiT_S_8", "DyDiLiT_B_2", "DyDiLiT_B_4", "DyDiLiT_B_8",
    "DyDiLiT_L_2", "DyDiLiT_L_4", "DyDiLiT_L_8", "DyDiLiT_XL_2", "DyDiLiT_XL_4", "DyDiLiT_XL_8",
]
