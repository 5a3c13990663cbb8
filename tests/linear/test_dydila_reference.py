"""The linear-attention and DyDiLA references: explicit loops, the ReLU special case, the spec's closed-form
power-map gradients, finite differences in every input, and precision."""

from __future__ import annotations

import pytest
import torch

from difattn.reference.dydila import dydila_attention, power_map
from difattn.reference.linear import linear_attention
from difattn.testing import assert_close, assert_finite

EPS = 1e-6
PER_TOKEN_NAMES = ("gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k")


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def uniform(shape, low, high, *, seed):
    return low + (high - low) * torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dydila_inputs(B=2, H=2, N=7, D=5, Dv=4, *, seed=0):
    """``(q, k, v, q_aux, k_aux)`` and the six per-token ``(B, H, N)`` tensors, float64, away from relu's kink."""
    tensors = [randn(B, H, N, D, seed=seed + i) + 0.5 for i in range(2)]
    tensors.append(randn(B, H, N, Dv, seed=seed + 2))
    tensors += [0.5 * randn(B, H, N, D, seed=seed + 3 + i) for i in range(2)]
    tensors = [torch.where(t.abs() < 1e-2, t + 2e-2, t) for t in tensors]
    gammas = [uniform((B, H, N), 1.0, 3.0, seed=seed + 10 + i) for i in range(4)]
    lambdas = [uniform((B, H, N), 0.0, 0.5, seed=seed + 20 + i) for i in range(2)]
    return tensors, dict(zip(PER_TOKEN_NAMES, gammas + lambdas))


# ---------------------------------------------------------------- naive twins, written from the formulas


def loop_linear_attention(q, k, v, normalize, eps=EPS):
    """One token at a time: ``S = (1/N) Σ_n k_nᵀ v_n``, ``O_n = q_n S`` (``/ (q_n · mean(k) + eps)``)."""
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            state = sum(torch.outer(k[b, h, n], v[b, h, n]) for n in range(N)) / N
            mean_k = sum(k[b, h, n] for n in range(N)) / N
            for n in range(N):
                out[b, h, n] = q[b, h, n] @ state
                if normalize:
                    out[b, h, n] = out[b, h, n] / (q[b, h, n] @ mean_k + eps)
    return out


def naive_features(q, k, q_aux, k_aux, params, eps=EPS):
    """``(Q̂, K̂)`` from the spec's formulas in the inputs' dtype, with no overflow guard."""

    def phi(z, gamma):
        r = torch.relu(z) + eps
        p = r ** gamma[..., None]
        return r.norm(dim=-1, keepdim=True) * p / p.norm(dim=-1, keepdim=True)

    p = {name: value.to(q.dtype) for name, value in params.items()}
    q_hat = phi(q, p["gamma_q"]) - p["lambda_q"][..., None] * phi(q_aux, p["gamma_q_aux"])
    k_hat = phi(k, p["gamma_k"]) - p["lambda_k"][..., None] * phi(k_aux, p["gamma_k_aux"])
    return q_hat, k_hat


def naive_dydila(q, k, v, q_aux, k_aux, params, normalize, eps=EPS):
    q_hat, k_hat = naive_features(q, k, q_aux, k_aux, params, eps)
    out = q_hat @ (k_hat.transpose(-1, -2) @ v / q.shape[2])
    if normalize:
        out = out / (q_hat @ k_hat.mean(dim=2)[..., None] + eps)
    return out


def assert_float64_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- linear attention


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_matches_token_loop(normalize):
    q, k = (torch.relu(randn(2, 3, 9, 6, seed=s)) + 0.1 for s in (0, 1))
    v = randn(2, 3, 9, 4, seed=2)
    assert_float64_equal(linear_attention(q, k, v, normalize=normalize), loop_linear_attention(q, k, v, normalize))


def test_linear_attention_normalized_weights_sum_to_one():
    q, k = (torch.relu(randn(1, 2, 16, 8, seed=s)) + 0.1 for s in (3, 4))
    ones = torch.ones(1, 2, 16, 3, dtype=torch.float64)
    out = linear_attention(q, k, ones, normalize=True, eps=1e-12)
    assert_float64_equal(out, ones)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_attention_keeps_q_dtype_and_is_accurate(dtype):
    q64, k64 = (torch.relu(randn(1, 2, 64, 32, seed=s)) + 0.1 for s in (5, 6))
    v64 = randn(1, 2, 64, 16, seed=7)
    out = linear_attention(q64.to(dtype), k64.to(dtype), v64.to(dtype))
    assert out.dtype == dtype
    inputs_low = [x.to(dtype).double() for x in (q64, k64, v64)]  # same rounded inputs, exact arithmetic
    assert_close("linear", out, linear_attention(*inputs_low).to(dtype), linear_attention(*inputs_low))


# ---------------------------------------------------------------- DyDiLA


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("as_tensors", [False, True])
def test_unit_gamma_zero_lambda_is_relu_linear_attention(normalize, as_tensors):
    (q, k, v, q_aux, k_aux), _ = dydila_inputs(seed=1)
    ones, zeros = torch.ones(q.shape[:3], dtype=torch.float64), torch.zeros(q.shape[:3], dtype=torch.float64)
    gamma, lam = (ones, zeros) if as_tensors else (1.0, 0.0)
    per_token = dict(zip(PER_TOKEN_NAMES, (gamma,) * 4 + (lam,) * 2))
    out = dydila_attention(q, k, v, q_aux, k_aux, **per_token, normalize=normalize)
    relu_features = [torch.relu(x) + EPS for x in (q, k)]
    assert_float64_equal(out, linear_attention(*relu_features, v, normalize=normalize))


@pytest.mark.parametrize("normalize", [False, True])
def test_dydila_matches_the_formulas(normalize):
    tensors, params = dydila_inputs(seed=2)
    assert_float64_equal(
        dydila_attention(*tensors, **params, normalize=normalize), naive_dydila(*tensors, params, normalize)
    )


def test_power_map_preserves_the_norm_and_float_gamma_broadcasts():
    z = randn(2, 3, 5, 8, seed=3)
    out = power_map(z, 2.5)
    assert_float64_equal(out.norm(dim=-1), (torch.relu(z) + EPS).norm(dim=-1))
    assert_float64_equal(out, power_map(z, torch.full((2, 3, 5), 2.5, dtype=torch.float64)))


def test_power_map_gradients_match_the_spec_formulas():
    z = randn(2, 3, 5, 8, seed=4).requires_grad_()
    gamma = uniform((2, 3, 5), 1.0, 4.0, seed=5).requires_grad_()
    G = randn(2, 3, 5, 8, seed=6)
    dz, dgamma = torch.autograd.grad((G * power_map(z, gamma)).sum(), (z, gamma))

    z, g = z.detach(), gamma.detach()[..., None]
    r = torch.relu(z) + EPS
    p = r**g
    n1, n2 = r.norm(dim=-1, keepdim=True), p.norm(dim=-1, keepdim=True)
    u = p / n2
    projected = G - u * (u * G).sum(dim=-1, keepdim=True)  # G − u (u·G)
    dr = (G * u).sum(dim=-1, keepdim=True) * r / n1 + g * r ** (g - 1) * (n1 / n2) * projected
    assert_float64_equal(dz, dr * (z > 0))
    assert_float64_equal(dgamma, (n1 / n2).squeeze(-1) * (projected * p * r.log()).sum(dim=-1))


@pytest.mark.parametrize("normalize", [False, True])
def test_dydila_gradcheck_every_input(normalize):
    tensors, params = dydila_inputs(B=1, H=2, N=5, D=3, Dv=2, seed=7)
    inputs = [x.requires_grad_() for x in (*tensors, *params.values())]
    q, k, _, q_aux, k_aux = tensors
    q_hat, k_hat = naive_features(q, k, q_aux, k_aux, params)
    assert (q_hat @ k_hat.mean(dim=2)[..., None]).abs().min() > 0.1  # finite differences far from a zero denominator

    def fn(q, k, v, q_aux, k_aux, *per_token):
        return dydila_attention(q, k, v, q_aux, k_aux, **dict(zip(PER_TOKEN_NAMES, per_token)), normalize=normalize)

    assert torch.autograd.gradcheck(fn, inputs)


def test_dydila_float32_forward_and_gradients():
    tensors, params = dydila_inputs(B=1, H=2, N=64, D=16, Dv=8, seed=8)
    names = ("q", "k", "v", "q_aux", "k_aux", *PER_TOKEN_NAMES)
    g = randn(1, 2, 64, 8, seed=9)

    def run(fn, dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (*tensors, *params.values())]
        out = fn(inputs[:5], dict(zip(PER_TOKEN_NAMES, inputs[5:])))
        return [out.detach(), *torch.autograd.grad(out, inputs, g.to(dtype))]

    fast = run(lambda t, p: dydila_attention(*t, **p), torch.float32)
    ref_low = run(lambda t, p: naive_dydila(*t, p, normalize=False), torch.float32)
    ref_high = run(lambda t, p: naive_dydila(*t, p, normalize=False), torch.float64)
    for i, name in enumerate(("out", *names)):
        assert_close(f"dydila {name}", fast[i], ref_low[i], ref_high[i], gradient=i > 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dydila_low_precision_does_not_overflow(dtype):
    tensors, params = dydila_inputs(B=1, H=2, N=32, D=16, Dv=8, seed=10)
    q, k, v, q_aux, k_aux = tensors
    tensors = [10 * q, 10 * k, v, 10 * q_aux, 10 * k_aux]  # r^5 up to ~1e7: past fp16's range, output is not
    params = {name: torch.full_like(p, 5.0) if name.startswith("gamma") else p for name, p in params.items()}
    out = dydila_attention(*(x.to(dtype) for x in tensors), **params)
    assert out.dtype == dtype
    assert_finite("dydila", out)
    expected = dydila_attention(*(x.to(dtype).double() for x in tensors), **params)
    assert (out.double() - expected).norm() / expected.norm() < 1e-2


def test_per_token_errors_name_the_argument():
    (q, k, v, q_aux, k_aux), params = dydila_inputs(seed=11)
    with pytest.raises(ValueError, match="lambda_k"):
        dydila_attention(q, k, v, q_aux, k_aux, **{**params, "lambda_k": params["lambda_k"][:, :, :3]})
    with pytest.raises(TypeError, match="gamma_q"):
        dydila_attention(q, k, v, q_aux, k_aux, **{**params, "gamma_q": "2"})
    with pytest.raises(ValueError, match="q_aux"):
        dydila_attention(q, k, v, q_aux[:, :1], k_aux, **params)
