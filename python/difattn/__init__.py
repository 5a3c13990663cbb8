"""difattn: efficient attention for Diffusion Transformers.

CLEAR (local discs), GRAT (grouped tiles), PISA (exact + Taylor-approximated blocks), LLSA (hierarchical
log-linear sparse) and DyDiLA (dynamic differential linear attention), each behind one function with the
``(B, H, N, D)`` layout of ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import logging as _logging
from importlib.metadata import PackageNotFoundError, version as _version

from .functional import (
    clear_attention,
    clear_global_kv,
    dydila_attention,
    grat_attention,
    linear_attention,
    llsa_attention,
    pisa_attention,
)
from .grid import TokenGrid
from . import nn  # noqa: F401  (difattn.nn, the modules, is part of the package namespace)

# The library reports through the "difattn" logger (e.g. what difattn.diffusers.apply changed) and never prints;
# the application decides where records go.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

try:
    __version__ = _version("difattn")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "TokenGrid",
    "clear_attention",
    "clear_global_kv",
    "grat_attention",
    "pisa_attention",
    "llsa_attention",
    "dydila_attention",
    "linear_attention",
    "__version__",
]
