"""LLSA: hierarchical top-K block selection with coarse-token enrichment, log-linear in N and trainable (Zhou et
al., "Trainable Log-linear Sparse Attention for Efficient Diffusion Transformers", arXiv 2512.16615).

:mod:`.plan` builds the pyramid, the selection and the block lists on the tensors' device; :mod:`.op` holds the
kernels' custom ops and the CPU plan ops; :mod:`.method` the pipelines the backend table runs.
"""

from .method import llsa_on_cpu, llsa_on_kernels

__all__ = ["llsa_on_cpu", "llsa_on_kernels"]
