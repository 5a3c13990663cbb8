"""Shared by the tests that run every method on every backend: where Triton can run, the (backend, dtype) cases of
the parity tests, and one small call of each method through its public function."""

from __future__ import annotations

import os

import pytest
import torch

import difattn

HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def parity_backends(*, triton_fp16: bool = False) -> list:
    """``(backend, dtype)`` cases: the torch reference, Rust in fp32 and bf16, Triton in fp32 (and fp16) marked
    ``interpreter`` (fp32/fp16 only: bf16 ``tl.dot`` is wrong under the interpreter)."""
    cases = [("torch", torch.float32), ("rust", torch.float32), ("rust", torch.bfloat16),
             pytest.param("triton", torch.float32, marks=pytest.mark.interpreter)]
    if triton_fp16:
        cases.append(pytest.param("triton", torch.float16, marks=pytest.mark.interpreter))
    return cases


def call_method(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: difattn.TokenGrid,
                backend: str) -> torch.Tensor:
    """``method`` on ``q, k, v (B, H, grid.num_tokens, D)`` with options that fit small grids (CLEAR r=2, GRAT
    2x2 groups, PISA blocks of 4, LLSA blocks of 2 with top-2; DyDiLA with q, k as its auxiliary streams)."""
    if method == "clear":
        return difattn.clear_attention(q, k, v, grid, radius=2.0, backend=backend)
    if method == "grat":
        return difattn.grat_attention(q, k, v, grid, group=(2, 2), backend=backend)
    if method == "pisa":
        return difattn.pisa_attention(q, k, v, block_size=4, backend=backend)
    if method == "llsa":
        return difattn.llsa_attention(q, k, v, block_size=2, topk=2, backend=backend)
    if method == "linear":
        return difattn.linear_attention(q.relu(), k.relu(), v, backend=backend)
    return difattn.dydila_attention(q, k, v, q, k, gamma_q=2.0, gamma_k=2.0, gamma_q_aux=1.5, gamma_k_aux=1.5,
                                    lambda_q=0.1, lambda_k=0.1, backend=backend)
