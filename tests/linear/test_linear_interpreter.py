"""Tier 1: the Triton linear-attention and DyDiLA kernels under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16,
tiny shapes), forward and every gradient against the torch reference.

Triton decides whether to interpret when a kernel is *defined*: ``triton.jit`` reads ``TRITON_INTERPRET`` as the
kernel module is imported. Without CUDA the conftest sets the variable before anything imports triton, and the
tests run here. With CUDA (or with the variable unset) the kernels of this process are compiled for the GPU, so
one test reruns this file in a subprocess with ``TRITON_INTERPRET=1`` and no visible GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

import difattn
from difattn import reference
from difattn.ops.linear.op import PER_TOKEN
from difattn.testing import assert_close, compare_with_reference, random_qkv

pytestmark = pytest.mark.interpreter

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
in_process = pytest.mark.skipif(not INTERPRETING, reason="runs in the subprocess of test_tier1_in_a_subprocess")
EPS = 1e-6


def _kernels():
    pytest.importorskip("triton")
    from difattn.triton_kernels import linear_attention as tk

    return tk


@pytest.mark.skipif(INTERPRETING, reason="this process already interprets")
def test_tier1_in_a_subprocess():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


@in_process
def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_kernels()._state_kernel, InterpretedFunction)


def _inputs(N, D, Dv, dtype, seed, lambda_max=0.5, B=1, H=2):
    q, k, v = random_qkv(B, H, N, D, Dv=Dv, dtype=dtype, seed=seed, token_major=True)
    q_aux, k_aux, _ = random_qkv(B, H, N, D, dtype=dtype, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    params = [1.0 + 4.0 * torch.rand(B, H, N, generator=gen) for _ in range(4)]
    params += [lambda_max * torch.rand(B, H, N, generator=gen) for _ in range(2)]
    return (q, k, v, (0.5 * q_aux.float()).to(dtype), (0.5 * k_aux.float()).to(dtype)), params


@in_process
@pytest.mark.parametrize("dtype, normalize, d", [(torch.float32, True, 24), (torch.float16, False, 24),
                                               (torch.float32, True, 192)])  # 192: LiT-S's head dim
def test_linear_triton_matches_reference(dtype, normalize, d):
    (q, k, v, _, _), _ = _inputs(37, d, 40, dtype, seed=1)
    q, k = q.relu() + 0.05, k.relu() + 0.05
    compare_with_reference(
        "linear triton",
        lambda q, k, v: difattn.linear_attention(q, k, v, normalize=normalize, backend="triton"),
        lambda q, k, v: reference.linear_attention(q, k, v, normalize=normalize),
        (q, k, v),
    )


@in_process
@pytest.mark.parametrize("dtype, normalize, d", [(torch.float32, False, 24), (torch.float16, True, 24),
                                               (torch.float32, False, 288)])  # 288: LiT-XL's head dim
def test_dydila_triton_matches_reference_in_every_input(dtype, normalize, d):
    tensors, params = _inputs(29, d, 16, dtype, seed=2, lambda_max=0.2 if normalize else 0.5)

    def run(backend):
        def fn(q, k, v, q_aux, k_aux, *p):
            kw = dict(zip(PER_TOKEN, p), normalize=normalize)
            if backend == "reference":
                return reference.dydila_attention(q, k, v, q_aux, k_aux, **kw)
            return difattn.dydila_attention(q, k, v, q_aux, k_aux, **kw, backend=backend)

        return fn

    compare_with_reference("dydila triton", run("triton"), run("reference"), (*tensors, *params))


def _check_launchers(fwd, bwd, ref, inputs, name):
    """Launcher forward and backward (no autograd) against the reference's forward and autograd gradients."""
    out, state, ksum = fwd(*inputs)
    gen = torch.Generator().manual_seed(0)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = bwd(*inputs, state, ksum, dout)
    refs = []
    for dtype in (inputs[0].dtype, torch.float64):
        leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
        r = ref(*leaves)
        refs.append((r, torch.autograd.grad(r, leaves, dout.to(dtype))))
    (low, low_g), (high, high_g) = refs
    assert_close(f"{name} out", out, low, high)
    for i, g in enumerate(grads):
        assert_close(f"{name} grad {i}", g.to(inputs[i].dtype), low_g[i], high_g[i], gradient=True)


@in_process
def test_tiled_state_split_tokens_and_ragged_head_dims():
    """16-wide tiles over D = 20 and Dv = 18 (masked tails), 16-token steps over N = 35 in 2 token splits, with
    normalisation (every branch of the backward)."""
    tk = _kernels()
    cfg, normalize = tk.Config(block_n=16, block_d=16, splits=2), True
    (q, k, v, q_aux, k_aux), params = _inputs(35, 20, 18, torch.float32, seed=3, lambda_max=0.2, B=2, H=1)
    q, k = q.relu() + 0.05, k.relu() + 0.05
    _check_launchers(
        lambda q, k, v: tk.linear_fwd(q, k, v, normalize, EPS, cfg),
        lambda q, k, v, s, m, g: tk.linear_bwd(q, k, v, s, m, g, normalize, EPS, cfg),
        lambda q, k, v: reference.linear_attention(q, k, v, normalize=normalize),
        (q, k, v), "linear tiled",
    )
    _check_launchers(
        lambda *x: tk.dydila_fwd(*x[:5], x[5:], normalize, EPS, cfg),
        lambda *x: tk.dydila_bwd(*x[:5], x[5:11], *x[11:], normalize, EPS, cfg),
        lambda *x: reference.dydila_attention(*x[:5], **dict(zip(PER_TOKEN, x[5:])), normalize=normalize),
        (q, k, v, q_aux, k_aux, *params), "dydila tiled",  # gradients come in the inputs' order
    )
