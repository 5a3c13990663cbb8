"""Tier 2 (CUDA only): the Triton linear-attention and DyDiLA kernels in bf16/fp16/fp32 with LiT's head dims
(72, 192, 288: tiled, masked state), on long sequences, under torch.compile without recompiling, and through
opcheck."""

import pytest
import torch

import difattn
from difattn import reference
from difattn.ops.linear import op as linear_ops
from difattn.testing import compare_with_reference, random_qkv

pytestmark = pytest.mark.gpu
PER_TOKEN = linear_ops.PER_TOKEN


def _dydila_inputs(B, H, N, D, dtype, seed=0, lambda_max=0.5):
    q, k, v = random_qkv(B, H, N, D, dtype=dtype, device="cuda", seed=seed, token_major=True)
    q_aux, k_aux, _ = random_qkv(B, H, N, D, dtype=dtype, device="cuda", seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    params = [(1.0 + 4.0 * torch.rand(B, H, N, generator=gen)).cuda() for _ in range(4)]
    params += [(lambda_max * torch.rand(B, H, N, generator=gen)).cuda() for _ in range(2)]
    return [q, k, v, (0.5 * q_aux), (0.5 * k_aux)], params


def _dydila(backend, normalize):
    def fn(q, k, v, q_aux, k_aux, *p):
        kw = dict(zip(PER_TOKEN, p), normalize=normalize)
        if backend == "reference":
            return reference.dydila_attention(q, k, v, q_aux, k_aux, **kw)
        return difattn.dydila_attention(q, k, v, q_aux, k_aux, **kw, backend=backend)

    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 72, 128, 192, 288])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_cuda_matches_reference(dtype, d, normalize):
    q, k, v = random_qkv(2, 3, 1000, d, dtype=dtype, device="cuda", seed=d, token_major=True)
    q, k = q.relu() + 0.05, k.relu() + 0.05
    compare_with_reference(
        "linear cuda",
        lambda q, k, v: difattn.linear_attention(q, k, v, normalize=normalize),
        lambda q, k, v: reference.linear_attention(q, k, v, normalize=normalize),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 72, 288])
def test_dydila_cuda_matches_reference_in_every_input(dtype, d):
    tensors, params = _dydila_inputs(1, 2, 777, d, dtype, seed=d)
    params = [p.to(dtype) for p in params] if dtype == torch.bfloat16 else params
    compare_with_reference("dydila cuda", _dydila("auto", False), _dydila("reference", False), (*tensors, *params))


def test_dydila_cuda_normalized_small_lambda():
    tensors, params = _dydila_inputs(2, 2, 513, 96, torch.bfloat16, seed=1, lambda_max=0.2)
    compare_with_reference("dydila cuda norm", _dydila("auto", True), _dydila("reference", True), (*tensors, *params))


def test_long_sequences_split_the_state_reduction():
    """One head over 128x128 tokens: the state reduction is split over N and the partial states summed; forward and
    every gradient against the reference."""
    q, k, v = random_qkv(1, 1, 128 * 128, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    q, k = q.relu() + 0.05, k.relu() + 0.05
    compare_with_reference(
        "linear split",
        lambda q, k, v: difattn.linear_attention(q, k, v),
        lambda q, k, v: reference.linear_attention(q, k, v),
        (q, k, v),
    )
    tensors, params = _dydila_inputs(1, 1, 64 * 64 * 4, 64, torch.bfloat16, seed=4)
    compare_with_reference("dydila split", _dydila("auto", False), _dydila("reference", False), (*tensors, *params))


def test_compile_fullgraph_and_no_recompile():
    import torch._dynamo

    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def run(q, k, v, q_aux, k_aux, *p):
        return difattn.dydila_attention(q, k, v, q_aux, k_aux, **dict(zip(PER_TOKEN, p)))

    for n in (1088, 1984):  # both multiples of 16, so no stride changes its divisibility
        tensors, params = _dydila_inputs(1, 2, n, 64, torch.bfloat16, seed=n)
        leaves = [x.requires_grad_() for x in (*tensors, *params)]
        out = run(*leaves)
        out.float().sum().backward()
        torch.testing.assert_close(out, _dydila("auto", False)(*leaves))
    from difattn.triton_kernels import linear_attention as tk

    caches = getattr(tk._readout_kernel, "device_caches", None)
    if caches is not None:  # one compiled variant per launch configuration served both sequence lengths
        assert len(caches[torch.cuda.current_device()][0]) <= 4


def test_opcheck_cuda():
    q, k, v = random_qkv(1, 2, 100, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    torch.library.opcheck(linear_ops.linear_attention_fwd, (q.relu(), k.relu(), v, True, 1e-6, "triton"))
    tensors, params = _dydila_inputs(1, 2, 100, 64, torch.bfloat16)
    args = [x.requires_grad_() for x in (*tensors, *params)]
    torch.library.opcheck(linear_ops.dydila_fwd, (*args, False, 1e-6, "triton"))


def _train_dydila_in_bf16(backend, steps=20):
    """Losses of AdamW steps fitting a fixed batch with difattn.nn.DyDiLA (head dim 96) under bf16 autocast."""
    torch.manual_seed(0)
    model = difattn.nn.DyDiLA(192, 2, backend=backend).cuda()
    x = torch.randn(2, 256, 192, device="cuda")
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x) - target).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_nn_dydila_trains_on_cuda_in_bf16_as_on_the_reference():
    """The loss falls, and step by step follows the same model trained with the torch reference as its core (same
    routing inputs, so only the kernels differ: bf16 rounding, and a rare routing flip once the weights drift)."""
    fast, ref = _train_dydila_in_bf16("auto"), _train_dydila_in_bf16("torch")
    assert fast[-1] < fast[0], fast[::5]
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=0)
