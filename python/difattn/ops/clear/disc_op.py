"""CLEAR's disc kernels on CPU as custom ops: ``difattn::clear_disc_fwd`` / ``_bwd``.

Each tile of 16 queries (4×4 image tokens) attends exactly the key ranges of its discs, read in place from the
raster order (no plan, no permutation: the Rust core's ``cpu::clear`` kernels). A Rust-only op, so its body calls
the core directly. q, k ``(B, H, N, D)``, v ``(B, H, N, Dv)``,
optional global tokens ``k_g (B, H, G, D)``, ``v_g (B, H, G, Dv)``; any strides, f32 / f16 / bf16. The forward
returns the output in q's dtype and the log-sum-exp (fp32) that the backward reuses.
"""

from __future__ import annotations

import torch

from ..._native import core
from .._base.descriptors import tensor_desc


def _pair(a: torch.Tensor | None, b: torch.Tensor | None):
    return None if a is None else (tensor_desc(a), tensor_desc(b))


@torch.library.custom_op("difattn::clear_disc_fwd", mutates_args=())
def clear_disc_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_g: torch.Tensor | None, v_g: torch.Tensor | None,
    frames: int, height: int, width: int, text_tokens: int, text_position: str, radius: float,
    temporal_radius: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    core().clear_forward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), _pair(k_g, v_g), tensor_desc(out), tensor_desc(lse),
        (frames, height, width, text_tokens, text_position), radius, temporal_radius, scale,
        torch.get_num_threads(),
    )
    return out, lse


@clear_disc_fwd.register_fake
def _(q, k, v, k_g, v_g, frames, height, width, text_tokens, text_position, radius, temporal_radius, scale):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("difattn::clear_disc_bwd", mutates_args=())
def clear_disc_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_g: torch.Tensor | None, v_g: torch.Tensor | None,
    out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, frames: int, height: int, width: int,
    text_tokens: int, text_position: str, radius: float, temporal_radius: float, scale: float,
) -> list[torch.Tensor]:
    """``[dq, dk, dv]``, then ``[dk_g, dv_g]`` with global tokens."""
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
    dk_g, dv_g = (None, None) if k_g is None else (torch.empty(t.shape, dtype=t.dtype) for t in (k_g, v_g))
    core().clear_backward(
        tensor_desc(q), tensor_desc(k), tensor_desc(v), _pair(k_g, v_g), tensor_desc(dout), tensor_desc(lse), tensor_desc(delta), tensor_desc(dq), tensor_desc(dk),
        tensor_desc(dv), _pair(dk_g, dv_g), (frames, height, width, text_tokens, text_position), radius,
        temporal_radius, scale, torch.get_num_threads(),
    )
    return [dq, dk, dv] + ([] if k_g is None else [dk_g, dv_g])


@clear_disc_bwd.register_fake
def _(q, k, v, k_g, v_g, out, dout, lse, frames, height, width, text_tokens, text_position, radius,
      temporal_radius, scale):
    like = [q, k, v] + ([] if k_g is None else [k_g, v_g])
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]


def _setup_context(ctx, inputs, output):
    q, k, v, k_g, v_g, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, k_g, v_g, out, lse)
    ctx.options = options


def _backward(ctx, dout, dlse):
    q, k, v, k_g, v_g, out, lse = ctx.saved_tensors
    grads = clear_disc_bwd(q, k, v, k_g, v_g, out, dout.contiguous(), lse, *ctx.options)
    dq, dk, dv, *global_grads = grads
    dk_g, dv_g = global_grads if global_grads else (None, None)
    return (dq, dk, dv, dk_g, dv_g) + (None,) * len(ctx.options)


clear_disc_fwd.register_autograd(_backward, setup_context=_setup_context)
