"""difattn's layers under ``torch.compile``: each layer's attention call is one opaque custom op.

What a layer does with a call depends on values a trace cannot know: FLUX's image grid is in the values of
``img_ids``, a text padding mask decides which text keys exist (and, for methods without a text mask, the
per-sample sub-grids), and ``dense_steps`` depends on the timestep. A traced graph would have to guard on those
values (``GuardOnDataDependentSymNode``) or bake in the ones it saw. So under ``torch.compile`` the processor
passes the call's tensors and the geometry it can read from shapes to ``difattn::diffusers_attention``, which does
in eager mode what the uncompiled layer does (:meth:`~._processor.LayerAttention.attend`). Its fake needs only
the shapes of q and v, so a transformer compiles with ``fullgraph=True`` and recompiles only when shapes (the
resolution, frame count or prompt length) change.

With ``dense_steps``, the transformer's forward pre-hook counts denoising steps in ``difattn::diffusers_step``
(eagerly, from the timestep's value) and every layer's op takes the step it returns, so the layer runs dense or
sparse by the step of the call, not the step seen while tracing.

The backward recomputes the layer's forward under autograd (the op saves its inputs, not the method's
intermediates): a compiled training step costs one more forward of the attention than an eager one.

The ops find their session or layer through a string key (ops take no Python objects): :func:`register` gives
one to each, held weakly; after ``remove()`` a stale compiled graph that calls it raises.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ._families import Geometry

_OBJECTS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()
_POSITIONS = ("first", "last")


def register(obj: Any, name: str) -> str:
    """A new key under which the ops find ``obj`` (a session or a difattn processor, held weakly)."""
    key = f"{next(_KEYS)}:{name}"
    _OBJECTS[key] = obj
    return key


def _lookup(key: str) -> Any:
    obj = _OBJECTS.get(key)
    if obj is None:
        raise RuntimeError(
            f"difattn: a compiled graph called {key.split(':', 1)[1]!r}, whose difattn processor is gone "
            "(difattn.diffusers.remove() or a new apply()); compile the transformer again"
        )
    return obj


@torch.library.custom_op("difattn::diffusers_step", mutates_args=())
def _step(timestep: torch.Tensor, session: str) -> torch.Tensor:
    s = _lookup(session)
    s.count_step(timestep)
    return torch.tensor(s.step, dtype=torch.int64)


@_step.register_fake
def _(timestep, session):
    return torch.empty((), dtype=torch.int64, device="cpu")


def denoising_step(session: Any, timestep: torch.Tensor) -> torch.Tensor:
    """Count the step of this call (``session.count_step``) when the graph runs; returns it as a CPU int64 scalar."""
    return _step(torch.as_tensor(timestep), session.key)


def _pack(geometry: Geometry) -> list[int]:
    return [geometry.frames, geometry.height, geometry.width, geometry.text_tokens,
            _POSITIONS.index(geometry.text_position), int(geometry.trimmed_text)]


def _run(q, k, v, attn_mask, spatial_weight, ids, step, geometry: list[int], layer: str, scale) -> torch.Tensor:
    """The layer's attention of one call, eagerly: dense in the session's dense steps, else its method."""
    processor = _lookup(layer)
    if step is not None and int(step) < processor.session.dense_steps:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    frames, height, width, text, position, trimmed = geometry
    call = Geometry(frames, height, width, text, _POSITIONS[position], bool(trimmed), ids)
    return processor.attend(q, k, v, attn_mask, call, scale, spatial_weight)


@torch.library.custom_op("difattn::diffusers_attention", mutates_args=())
def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    spatial_weight: torch.Tensor | None, ids: torch.Tensor | None, step: torch.Tensor | None, geometry: list[int],
    layer: str, scale: float | None,
) -> torch.Tensor:
    out = _run(q, k, v, attn_mask, spatial_weight, ids, step, geometry, layer, scale)
    return out.contiguous()  # the strides the fake promises


@_attention.register_fake
def _(q, k, v, attn_mask, spatial_weight, ids, step, geometry, layer, scale):
    return q.new_empty(*q.shape[:3], v.shape[3])


@contextlib.contextmanager
def _autograd_enabled() -> Iterator[None]:
    """Autograd inside an op's implementation, which the dispatcher runs with the autograd keys excluded: lift
    that exclusion and enable grad (as torch's own ``leaf_function`` does around its eager body)."""
    excluded = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


@torch.library.custom_op("difattn::diffusers_attention_backward", mutates_args=())
def _attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    spatial_weight: torch.Tensor | None, ids: torch.Tensor | None, step: torch.Tensor | None, geometry: list[int],
    layer: str, scale: float | None,
) -> list[torch.Tensor]:
    """``[dq, dk, dv]`` (and the ``spatial_weight`` gradient when there is one), by running the forward again
    under autograd."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if spatial_weight is not None:
        leaves.append(spatial_weight.detach().requires_grad_())
    weight = leaves[3] if spatial_weight is not None else None
    with _autograd_enabled():
        out = _run(*leaves[:3], attn_mask, weight, ids, step, geometry, layer, scale)
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return [torch.zeros(x.shape, dtype=x.dtype, device=x.device) if g is None else g.contiguous()
            for g, x in zip(grads, leaves)]


@_attention_backward.register_fake
def _(dout, q, k, v, attn_mask, spatial_weight, ids, step, geometry, layer, scale):
    tensors = (q, k, v) if spatial_weight is None else (q, k, v, spatial_weight)
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in tensors]  # contiguous


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, attn_mask, spatial_weight, ids, step, geometry, layer, scale = inputs
    ctx.save_for_backward(q, k, v, attn_mask, spatial_weight, ids, step)
    ctx.options = (geometry, layer, scale)


def _backward(ctx: Any, dout: torch.Tensor) -> tuple:
    q, k, v, attn_mask, spatial_weight, ids, step = ctx.saved_tensors
    grads = _attention_backward(dout.contiguous(), q, k, v, attn_mask, spatial_weight, ids, step, *ctx.options)
    dweight = grads[3] if spatial_weight is not None else None
    return (grads[0], grads[1], grads[2]) + (None, dweight) + (None,) * 5


_attention.register_autograd(_backward, setup_context=_setup_context)


def layer_attention(processor: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None, geometry: Geometry, scale: float | None) -> torch.Tensor:
    """``processor``'s attention of one call, ``(B, H, N, D)`` in and ``(B, H, N, Dv)`` out, as one op."""
    session = processor.session
    step = session.step_tensor if session.dense_steps else None
    return _attention(q, k, v, attn_mask, processor.spatial_weight, geometry.ids, step, _pack(geometry),
                      processor.key, scale)
