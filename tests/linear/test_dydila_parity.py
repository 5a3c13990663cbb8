"""DyDiLA cross-attention (query and key lengths differ), on every backend, forward and every gradient (per-token
exponents and lambdas included), against a twin written token by token from the formulas::

    φ_γ(z) = ‖r‖ r^γ / ‖r^γ‖, r = relu(z) + eps;  Q̂ = φ_γq(q) − λ_q φ_γq_aux(q_aux),  K̂ likewise over the Nk keys;
    O_n = Q̂_n S,  S = (1/Nk) Σ_m K̂_mᵀ v_m   (normalize: O_n / (Q̂_n · (1/Nk) Σ_m K̂_m + eps))
"""

from __future__ import annotations


import pytest
import torch

import difattn
from difattn.testing import compare_with_reference
from backend_cases import DEVICE, HAS_TRITON, parity_backends

BACKENDS = parity_backends(triton_fp16=False)
EPS = 1e-6
# Query side, key side: the per-token parameters of each.
Q_SIDE, K_SIDE = ("gamma_q", "gamma_q_aux", "lambda_q"), ("gamma_k", "gamma_k_aux", "lambda_k")


def twin(q, k, v, q_aux, k_aux, gamma_q, gamma_q_aux, lambda_q, gamma_k, gamma_k_aux, lambda_k, normalize):
    """The formulas above, one token at a time (float64 when the inputs are)."""

    def phi(z, gamma):
        r = torch.relu(z) + EPS
        return r.norm() * r**gamma / (r**gamma).norm()

    B, H, N, _ = q.shape
    Nk = k.shape[2]
    rows = []
    for b in range(B):
        for h in range(H):
            k_hat = [phi(k[b, h, m], gamma_k[b, h, m]) - lambda_k[b, h, m] * phi(k_aux[b, h, m], gamma_k_aux[b, h, m])
                     for m in range(Nk)]
            state = sum(torch.outer(k_hat[m], v[b, h, m]) for m in range(Nk)) / Nk
            mean_k = sum(k_hat) / Nk
            for n in range(N):
                q_hat = phi(q[b, h, n], gamma_q[b, h, n]) - lambda_q[b, h, n] * phi(q_aux[b, h, n],
                                                                                    gamma_q_aux[b, h, n])
                out = q_hat @ state
                rows.append(out / (q_hat @ mean_k + EPS) if normalize else out)
    return torch.stack(rows).reshape(B, H, N, v.shape[-1])


def inputs(num_queries: int, num_keys: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, low=-1.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)

    B, H, D, Dv = 1, 2, 6, 5
    tensors = [rand(B, H, num_queries, D, low=0.1), rand(B, H, num_keys, D, low=0.1), rand(B, H, num_keys, Dv),
               rand(B, H, num_queries, D), rand(B, H, num_keys, D)]
    q_side = [rand(B, H, num_queries, low=1.0, high=3.0), rand(B, H, num_queries, low=1.0, high=3.0),
              rand(B, H, num_queries, low=0.0, high=0.5)]
    k_side = [rand(B, H, num_keys, low=1.0, high=3.0), rand(B, H, num_keys, low=1.0, high=3.0),
              rand(B, H, num_keys, low=0.0, high=0.5)]
    return tensors + q_side + k_side


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("lengths", [(9, 23), (21, 4)])
@pytest.mark.parametrize("normalize", [False, True])
def test_cross_attention_matches_the_twin(backend, dtype, lengths, normalize):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")

    def fast(q, k, v, q_aux, k_aux, *params):
        named = dict(zip(Q_SIDE + K_SIDE, params))
        return difattn.dydila_attention(q, k, v, q_aux, k_aux, **named, normalize=normalize, backend=backend)

    def ref(*tensors):
        return twin(*(t.cpu() for t in tensors), normalize).to(tensors[0].device)

    compare_with_reference(f"dydila cross {backend} {lengths}", fast, ref, inputs(*lengths, dtype, seed=3))


@pytest.mark.parametrize("backend", ["torch", "rust"])
def test_float_parameters_expand_over_their_side(backend):
    """Floats stand for a constant over each side's own tokens (N queries, Nk keys)."""
    tensors = inputs(5, 11, torch.float32, seed=4)[:5]
    params = dict(gamma_q=2.0, gamma_q_aux=1.5, lambda_q=0.25, gamma_k=2.5, gamma_k_aux=1.0, lambda_k=0.1)
    out = difattn.dydila_attention(*tensors, **params, backend=backend)
    full = {name: torch.full((1, 2, 11 if "_k" in name else 5), value, dtype=torch.float64)
            for name, value in params.items()}
    expected = twin(*(t.cpu().double() for t in tensors), *(full[name] for name in Q_SIDE + K_SIDE), False)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-5)


def test_cross_attention_shapes_are_checked():
    q, k, v, q_aux, k_aux, gq, gqa, lq, gk, gka, lk = inputs(5, 11, torch.float32, seed=5)
    params = dict(gamma_q=gq, gamma_q_aux=gqa, lambda_q=lq, gamma_k=gk, gamma_k_aux=gka, lambda_k=lk)
    with pytest.raises(ValueError, match="k_aux must have k's shape"):
        difattn.dydila_attention(q, k, v, q_aux, q_aux, **params)
    with pytest.raises(ValueError, match=r"gamma_k must have shape \(B, H, Nk\)"):
        difattn.dydila_attention(q, k, v, q_aux, k_aux, **{**params, "gamma_k": gq})
    with pytest.raises(ValueError, match=r"lambda_q must have shape \(B, H, N\)"):
        difattn.dydila_attention(q, k, v, q_aux, k_aux, **{**params, "lambda_q": lk})
    with pytest.raises(ValueError, match="v must have k's sequence length"):
        difattn.dydila_attention(q, k, v[:, :, :5], q_aux, k_aux, **params)
