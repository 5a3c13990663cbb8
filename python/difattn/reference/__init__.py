"""The torch backend: readable reference twins of every public function (any device, any float dtype,
float64 included, differentiable by autograd). Every fast path is tested against these."""

from ._dense import dense_attention, masked_attention
from .clear import clear_attention, clear_mask
from .dydila import dydila_attention, power_map
from .grat import grat_attention, grat_mask
from .linear import linear_attention
from .llsa import llsa_attention
from .pisa import pisa_attention

__all__ = [
    "dense_attention",
    "masked_attention",
    "clear_attention",
    "clear_mask",
    "grat_attention",
    "grat_mask",
    "pisa_attention",
    "llsa_attention",
    "dydila_attention",
    "power_map",
    "linear_attention",
]
