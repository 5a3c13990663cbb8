"""Triton kernel sources, one module per kernel family (shipped inside the wheel as
``difattn.triton_kernels``; never a top-level ``triton_kernels`` package).

Nothing here is imported by ``import difattn``: the triton backend imports a family only when it runs.
"""
