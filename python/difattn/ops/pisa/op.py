"""PISA's fused kernel as custom ops: ``difattn::pisa_fwd`` / ``difattn::pisa_bwd``.

One kernel per query block runs an online softmax over the tokens of its selected key blocks and over every other
block's centroid (key ``k̄_j``, logit ``+ ln n_j``, value ``w_j = V̂_j / n_j``), keeping ``z = Σ_unselected
n_j e^{c_j − m}`` for the first-order term: ``out = (acc + s·z·(q·H̄)) / den``, ``H̄`` the mean moment per token. The
forward returns ``out`` (q's dtype), ``lse`` and ``zeta = z / den`` (fp32, reused by the backward); the backward
returns the gradients of q, k, v (exact entries), k̄, w and H̄, which autograd carries through :mod:`.stats` to every
token of their blocks.
"""

from __future__ import annotations

import torch

from .._base.registry import launcher, register_lazy

register_lazy("pisa_fwd", "rust", f"{__package__}.rust_launch", "forward")
register_lazy("pisa_bwd", "rust", f"{__package__}.rust_launch", "backward")
register_lazy("pisa_fwd", "triton", "difattn.triton_kernels.pisa", "pisa_fwd")
register_lazy("pisa_bwd", "triton", "difattn.triton_kernels.pisa", "pisa_bwd")


@torch.library.custom_op("difattn::pisa_fwd", mutates_args=())
def pisa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, value_mean: torch.Tensor,
    moment_mean: torch.Tensor | None, perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, max_block: int,
    scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (B, H, N, Dv) in q's dtype, lse (B, H, N) fp32, zeta (B, H, N) fp32)``; ``moment_mean`` (``H̄``, fp32)
    adds the hybrid order's first-order term, None gives the zeroth order."""
    return launcher("pisa_fwd", backend)(q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, scale,
                                         max_block)


@pisa_fwd.register_fake
def _(q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, max_block, scale, backend):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32),
            q.new_empty(B, H, N, dtype=torch.float32))


@torch.library.custom_op("difattn::pisa_bwd", mutates_args=())
def pisa_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mean: torch.Tensor, value_mean: torch.Tensor,
    moment_mean: torch.Tensor | None, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, zeta: torch.Tensor,
    perm: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, max_block: int, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dkey_mean, dvalue_mean, dmoment_mean)``: dk, dv of the exact entries only, the statistics'
    gradients fp32 (``dmoment_mean`` empty without ``moment_mean``)."""
    return launcher("pisa_bwd", backend)(q, k, v, key_mean, value_mean, moment_mean, out, dout, lse, zeta, perm,
                                         offsets, blocks, scale, max_block)


@pisa_bwd.register_fake
def _(q, k, v, key_mean, value_mean, moment_mean, out, dout, lse, zeta, perm, offsets, blocks, max_block, scale,
      backend):
    contiguous = lambda x, dtype: torch.empty(x.shape, dtype=dtype, device=q.device)  # noqa: E731
    dhm = q.new_empty(moment_mean.shape if moment_mean is not None else (0,), dtype=torch.float32)
    return (contiguous(q, q.dtype), contiguous(k, q.dtype), contiguous(v, q.dtype),
            contiguous(key_mean, torch.float32), contiguous(value_mean, torch.float32), dhm)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mean, value_mean, moment_mean, perm, offsets, blocks, max_block, scale, backend = inputs
    out, lse, zeta = output
    ctx.save_for_backward(q, k, v, key_mean, value_mean, moment_mean, out, lse, zeta, perm, offsets, blocks)
    ctx.options = (max_block, scale, backend)


def _backward(ctx, dout, _dlse, _dzeta):
    q, k, v, key_mean, value_mean, moment_mean, out, lse, zeta, perm, offsets, blocks = ctx.saved_tensors
    dq, dk, dv, dkm, dvm, dhm = pisa_bwd(q, k, v, key_mean, value_mean, moment_mean, out, dout.contiguous(), lse, zeta,
                                         perm, offsets, blocks, *ctx.options)
    return dq, dk, dv, dkm, dvm, None if moment_mean is None else dhm, None, None, None, None, None, None


pisa_fwd.register_autograd(_backward, setup_context=_setup_context)
