"""PISA: exact attention on each query block's top key blocks (by centroid score), a Taylor expansion of the rest:
zeroth order (centroids with weight ``n_j``) plus the first-order term ``s·(Σ n_j e^{c_j−m})·q·H̄`` of the hybrid
order (``H̄`` the mean moment per token) (Li et al., "PISA: Piecewise Sparse Attention Is Wiser for Efficient
Diffusion Transformers", arXiv 2602.01077).

:mod:`.layout` blocks the tokens (text runs, image tiles), :mod:`.stats` makes the block statistics and the
routing, :mod:`.op` the fused kernel's custom ops, :mod:`.method` the pipeline the backend table runs.
"""

from .method import pisa_on_kernels

__all__ = ["pisa_on_kernels"]
