"""Ops: autograd-aware custom ops (``torch.library``) over the compiled kernels, and the per-method backend
implementations built on them."""
