"""Linear attention (LiT: ReLU features, ``O = q S`` with ``S = (1/N) Σ kᵀ v``) and DyDiLA, the dynamic
differential linear attention that runs the same core on routed power-map features with a token differential
(Cao et al., "Dynamic Differential Linear Attention: Enhancing Linear Diffusion Transformer for High-Quality
Image Generation", arXiv 2601.13683)."""

from .method import dydila_on_kernels, linear_on_kernels

__all__ = ["dydila_on_kernels", "linear_on_kernels"]
