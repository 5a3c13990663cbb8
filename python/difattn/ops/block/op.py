"""The block engine as custom ops: ``difattn::block_attention_fwd`` / ``difattn::block_attention_bwd``.

Both take q, k ``(B, H, N, D)`` and v ``(B, H, N_k, Dv)`` with any strides, an optional ``key_valid`` ``(B, N_k)``
bool in sequence order (applied on masked entries: GRAT's text padding), the plan's key
(:meth:`.plan.BlockPlanKey.op_args`), the softmax scale and the backend whose launcher runs them. The forward returns
the output in q's dtype and the log-sum-exp ``(B, H, N)`` fp32 that the backward reuses; the backward returns dq,
dk, dv (contiguous, q's dtype).
"""

from __future__ import annotations

import torch

from .._base.registry import launcher, register_lazy
from .plan import BlockPlan, BlockPlanKey, block_plan

for _backend in ("rust", "triton"):
    for _op, _name in (("block_attention_fwd", "forward"), ("block_attention_bwd", "backward")):
        register_lazy(_op, _backend, f"{__package__}.{_backend}_launch", _name)


def _plan_and_valid(q: torch.Tensor, key_valid: torch.Tensor | None, kind: str, ints: list[int],
                    floats: list[float]) -> tuple[BlockPlan, torch.Tensor | None]:
    """The cached plan on q's device and ``key_valid`` in the plan's key order (what the kernels index)."""
    plan = block_plan(BlockPlanKey.from_op_args(kind, ints, floats), q.device)
    valid = None if key_valid is None else key_valid[:, plan.k_perm].contiguous()
    return plan, valid


@torch.library.custom_op("difattn::block_attention_fwd", mutates_args=())
def block_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, plan_kind: str,
    plan_ints: list[int], plan_floats: list[float], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan, valid = _plan_and_valid(q, key_valid, plan_kind, plan_ints, plan_floats)
    return launcher("block_attention_fwd", backend)(q, k, v, plan, valid, scale)


@block_attention_fwd.register_fake
def _(q, k, v, key_valid, plan_kind, plan_ints, plan_floats, scale, backend):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("difattn::block_attention_bwd", mutates_args=())
def block_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
    key_valid: torch.Tensor | None, plan_kind: str, plan_ints: list[int], plan_floats: list[float], scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan, valid = _plan_and_valid(q, key_valid, plan_kind, plan_ints, plan_floats)
    return launcher("block_attention_bwd", backend)(q, k, v, out, dout, lse, plan, valid, scale)


@block_attention_bwd.register_fake
def _(q, k, v, out, dout, lse, key_valid, plan_kind, plan_ints, plan_floats, scale, backend):
    return tuple(torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_valid, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_valid)
    ctx.options = options


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_valid = ctx.saved_tensors
    dq, dk, dv = block_attention_bwd(q, k, v, out, dout.contiguous(), lse, key_valid, *ctx.options)
    return (dq, dk, dv) + (None,) * 6


block_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: BlockPlanKey, *, scale: float,
                    backend: str, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query over the keys the plan of ``key`` allows, on ``backend``'s engine.
    ``key_valid``: ``(B, N_k)`` bool in sequence order, applied on masked entries. Returns ``(B, H, N, Dv)``."""
    kind, ints, floats = key.op_args()
    out, _ = block_attention_fwd(q, k, v, key_valid, kind, ints, floats, float(scale), backend)
    return out
