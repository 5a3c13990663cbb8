"""The difattn processor: the model's own processor, with its attention call replaced.

Every supported model computes q, k, v its own way (fused or separate projections, q/k norms, RoPE, text
before or after the image) and then calls one attention function on ``(B, H, N, D)`` tensors. Rewriting each
processor for each diffusers release would copy that code and break with the next one; instead
:class:`DifattnProcessor` runs the stock processor and replaces only its self-attention call, by one of two
routes:

- **dispatcher**: processors that call diffusers' attention dispatcher (``_attention_backend`` attribute) get
  difattn's registered backend for the call (:mod:`._dispatcher`, on diffusers versions where the private
  registry layout is known);
- **SDPA interception**: otherwise a ``TorchFunctionMode`` catches ``F.scaled_dot_product_attention`` for the
  duration of the call (dispatcher processors are pinned to the native backend meanwhile).

Either way the call reaches :class:`LayerAttention`, which turns the call's geometry and padding mask into a
:class:`~difattn.TokenGrid` and a ``text_mask`` and runs the method. Calls with a different key length (Wan's
image cross-attention, IP adapters) pass through to SDPA. A difattn layer that sees no attention call raises,
so a processor path difattn cannot reach never runs dense silently.

Context parallelism (diffusers' ``enable_parallelism`` with a ``ContextParallelConfig``): the model's ``_cp_plan``
splits the sequence into balanced runs of text and image tokens per rank, and the dispatcher hands difattn's
backend this rank's shard. diffusers' own "ring" and "Ulysses" attention cannot carry a local method exactly (the
ring all-gathers K/V chunk by chunk into an op that is not told where the chunk sits; under Ulysses a joint model
sees ``[txt_0, img_0, txt_1, img_1, ...]``), so difattn never uses them: it runs its own exact schemes of
:mod:`difattn.distributed` over the whole context-parallel mesh, on the layout diffusers' split produced (image
row stripes when each rank's image run is whole rows of a single frame, where the halo scheme applies; Ulysses
otherwise). Only the dispatcher route can see the shards, so context parallelism needs it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._methods import sparse_attention
from ..functional import clear_global_kv
from ..grid import TokenGrid
from . import _compiled, _dispatcher
from ._families import Geometry

if TYPE_CHECKING:
    from ._session import Session

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class DifattnProcessor(nn.Module):
    """Wraps one layer's stock processor; see the module docstring.

    An ``nn.Module`` so that CLEAR's global-token pooling weight is a parameter of the transformer, under the
    reference's name: ``<layer>.processor.spatial_weight``, shape ``(1, 1, 1, d, 1, d, 1)``. The stock processor
    is held outside the module tree, so the state dict gains nothing else.
    """

    def __init__(self, original: Any, session: "Session", index: int, name: str) -> None:
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: keeps the state dict unchanged
        self.session, self.index, self.name = session, index, name
        self.key = _compiled.register(self, name)
        d = session.down_factor
        self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, d, 1, d, 1), d**-2.0)) if d else None

    def extra_repr(self) -> str:
        return f"{self.name}: {self.session.method} around {type(self.original).__name__}"

    def _run(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.session.runs_dense(self.index):
            return self.original(attn, *args, **kwargs)
        layer = LayerAttention(self)
        with self._route(layer):
            out = self.original(attn, *args, **kwargs)
        if layer.calls == 0:
            raise RuntimeError(
                f"difattn: layer {self.name} ran {type(self.original).__name__} without an attention call difattn "
                "could replace (an attention backend other than native/SDPA?); call difattn.diffusers.remove()"
            )
        return out

    def attend(self, q, k, v, attn_mask, geometry: Geometry, scale, spatial_weight) -> torch.Tensor:
        """This layer's method on one call (what :mod:`._compiled`'s op runs); see :meth:`LayerAttention.attend`."""
        return LayerAttention(self).attend(q, k, v, attn_mask, geometry, scale, spatial_weight)

    @contextlib.contextmanager
    def _route(self, layer: "LayerAttention") -> Iterator[None]:
        original, session = self.original, self.session
        uses_dispatcher = hasattr(original, "_attention_backend")
        backend = session.backend if uses_dispatcher else None
        if backend is None and getattr(original, "_parallel_config", None) is not None:
            raise NotImplementedError(
                f"difattn: layer {self.name} is context-parallel, which difattn supports through diffusers' attention "
                f"dispatcher registry (diffusers {_dispatcher.tested_range()}); this diffusers version has no "
                "registry difattn knows"
            )
        if backend is not None:
            with _pinned_backend(original, backend), _dispatcher.active(layer):
                yield
        else:
            pin = _pinned_backend(original, session.native) if uses_dispatcher else contextlib.nullcontext()
            with pin, _InterceptSDPA(layer):
                yield

    # diffusers' attention modules read these from the processor; they belong to the stock one.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value


@functools.cache
def processor_class(original_cls: type) -> type:
    """A :class:`DifattnProcessor` subclass whose ``__call__`` has the signature of ``original_cls.__call__``.

    diffusers' attention modules inspect the processor's ``__call__`` signature and drop keyword arguments it
    does not name (e.g. HunyuanVideo's ``image_rotary_emb``), so the wrapper must name what the stock one names.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    __call__.__signature__ = inspect.signature(original_cls.__call__)  # type: ignore[attr-defined]
    return type(f"Difattn{original_cls.__name__}", (DifattnProcessor,), {"__call__": __call__, "__module__": __name__})


@contextlib.contextmanager
def _pinned_backend(processor: Any, backend: Any) -> Iterator[None]:
    """Set the stock processor's dispatcher backend for one call, then restore it."""
    had, previous = "_attention_backend" in vars(processor), vars(processor).get("_attention_backend")
    processor._attention_backend = backend
    try:
        yield
    finally:
        if had:
            processor._attention_backend = previous
        else:
            del processor._attention_backend


class _InterceptSDPA(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` calls made inside the block to a :class:`LayerAttention`."""

    def __init__(self, layer: "LayerAttention") -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(_SDPA_ARGS, args), **kwargs)
        return self.layer(**call)


class LayerAttention:
    """The replacement attention of one layer for one call: ``(B, H, N, D)`` in, ``(B, H, N, Dv)`` out."""

    def __init__(self, processor: DifattnProcessor) -> None:
        self.processor, self.session, self.calls = processor, processor.session, 0

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        q, k, v = query, key, value
        if k.shape[-2] != q.shape[-2]:  # cross-attention to another context: not ours
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                **({"enable_gqa": True} if enable_gqa else {}),
            )
        name = self.processor.name
        if dropout_p or is_causal or k.shape[1] != q.shape[1]:
            raise ValueError(f"difattn: layer {name} asks for dropout, causal or grouped-query attention")
        self.calls += 1
        if parallel_config is not None:
            return self._attend_sharded(q, k, v, attn_mask, scale, parallel_config)
        geometry = self.session.geometry()
        if torch.compiler.is_compiling():
            return _compiled.layer_attention(self.processor, q, k, v, attn_mask, geometry, scale)
        return self.attend(q, k, v, attn_mask, geometry, scale, self.processor.spatial_weight)

    def attend(self, q, k, v, attn_mask, geometry: Geometry, scale, spatial_weight) -> torch.Tensor:
        """The method on this call's grid (read from ``geometry``), text padding (from ``attn_mask``) and CLEAR's
        global tokens (pooled with ``spatial_weight``). Runs eagerly: values decide the grid, mask and sub-grids."""
        grid = geometry.resolved().grid(q.shape[2])
        scale = self.session.scale(grid.num_tokens, q.shape[3], scale)
        text_mask = text_padding(attn_mask, grid, q.shape[0], self.processor.name)
        global_kv = None if spatial_weight is None else clear_global_kv(k, v, grid, spatial_weight)
        run = functools.partial(self._attend, scale=scale)
        if text_mask is None or self.session.spec.text_mask:
            return run(q, k, v, grid, text_mask, global_kv)
        return _per_sample(run, q, k, v, grid, text_mask, global_kv, scale)

    def _attend_sharded(self, q, k, v, attn_mask, scale, parallel_config) -> torch.Tensor:
        """This rank's shard under diffusers' context parallelism, by difattn's own exact schemes."""
        from ..distributed._attention import run
        from ..distributed._comm import Comm

        name = self.processor.name
        if attn_mask is not None or self.processor.spatial_weight is not None:
            raise NotImplementedError(
                f"difattn: layer {name} is context-parallel with an attention mask or CLEAR's global tokens "
                "(down_factor), which difattn does not shard yet"
            )
        comm = Comm(parallel_config.context_parallel_config._flattened_mesh.get_group())
        layout = _context_parallel_layout(self.session.geometry(), q.shape[2], comm.rank, comm.world, name)
        options = dict(self.session.options, scale=self.session.scale(layout.grid.num_tokens, q.shape[3], scale))
        return run(self.session.method, comm, layout, q, k, v, self.session.parallel, options)

    def _attend(self, q, k, v, grid, text_mask, global_kv, *, scale):
        return sparse_attention(
            self.session.method, q, k, v, grid=grid, options=self.session.options, scale=scale,
            text_mask=text_mask, global_kv=global_kv,
        )


def _context_parallel_layout(geometry, num_tokens: int, rank: int, world: int, name: str):
    """The layout of diffusers' split (balanced runs of text and image tokens) of the joint or image-only sequence
    that puts ``num_tokens`` tokens on ``rank``."""
    from ..distributed._layout import Layout

    image = geometry.frames * geometry.height * geometry.width
    for total in dict.fromkeys((image + geometry.text_tokens, image)):
        layout = Layout.chunks(geometry.grid(total), world)
        if layout.count(rank) == num_tokens:
            return layout
    raise ValueError(
        f"difattn: layer {name} got {num_tokens} tokens on rank {rank} of {world}, which is no rank's share of this "
        f"call's {image} image and {geometry.text_tokens} text tokens under diffusers' context-parallel split"
    )


def text_padding(attn_mask: torch.Tensor | None, grid: TokenGrid, batch: int, name: str) -> torch.Tensor | None:
    """The ``(B, T)`` bool text mask a key-padding ``attn_mask`` expresses (None when nothing is padded).

    Accepts bool masks and additive float masks (0 = attend, very negative = masked), shaped ``(B, N)``,
    ``(B, 1, N)``, ``(B, 1, 1, N)`` or ``(B, 1, N, N)``. A square mask must give every real token's query the same
    keys; the rows of padded text queries may hold anything (Chroma masks them whole): their outputs are padding,
    which no real token reads. Masks on image keys, per-head masks or different rows for real queries raise
    ``ValueError``: no difattn method expresses them.
    """
    if attn_mask is None:
        return None
    n = grid.num_tokens
    if attn_mask.dtype == torch.bool:
        allowed = attn_mask
    elif attn_mask.is_floating_point() and bool((attn_mask[attn_mask != 0] <= -1e4).all()):
        allowed = attn_mask == 0
    else:
        raise ValueError(f"difattn: layer {name} got an attention bias, not a padding mask; no method supports it")
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(1)
    if allowed.shape[1] != 1 or allowed.shape[-1] != n or allowed.shape[0] not in (1, batch):
        raise ValueError(f"difattn: layer {name} got an attention mask of shape {tuple(attn_mask.shape)}")
    rows = allowed[:, 0]  # (B or 1, 1 or N, N)
    if rows.shape[1] == 1:
        keys = rows[:, 0]
    else:
        keys = rows.diagonal(dim1=-2, dim2=-1)  # a real token sees itself, so the diagonal is the key mask
        same = (rows == keys[:, None, :]).all(dim=-1)  # (B, N): the query's row is the key mask
        if not bool(same[keys].all()):
            raise ValueError(f"difattn: layer {name} got a per-query attention mask; only key padding is supported")
    keys = keys.expand(batch, n)
    image = slice(grid.image_range.start, grid.image_range.stop)
    if not bool(keys[:, image].all()):
        raise ValueError(f"difattn: layer {name} got an attention mask on image tokens; only text padding is supported")
    text = keys[:, grid.text_range.start : grid.text_range.stop]
    return None if bool(text.all()) else text.contiguous()


def _per_sample(run, q, k, v, grid: TokenGrid, text_mask: torch.Tensor, global_kv, scale) -> torch.Tensor:
    """A method without a text mask on padded text: each sample runs on its real tokens only.

    Padded text rows are not keys for anyone, so dropping them is exact; their own outputs (which nothing
    downstream of the image reads) are computed as dense attention over the real tokens, as SDPA would.
    """
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    offset = grid.text_range.start
    for b in range(q.shape[0]):
        real = int(text_mask[b].sum())
        if not bool(text_mask[b, :real].all()):
            raise ValueError("difattn: text padding must come after the real text tokens")
        sub = TokenGrid(grid.height, grid.width, grid.frames, real, grid.text_position)
        image = torch.arange(grid.image_range.start, grid.image_range.stop)
        keep = torch.cat([image, torch.arange(offset, offset + real)]).sort().values.to(q.device)
        pad = torch.arange(offset + real, offset + grid.text_tokens, device=q.device)
        qb, kb, vb = (x[b : b + 1, :, keep] for x in (q, k, v))
        g = None if global_kv is None else tuple(x[b : b + 1] for x in global_kv)
        out[b : b + 1, :, keep] = run(qb, kb, vb, sub, None, g)
        if pad.numel():
            out[b : b + 1, :, pad] = F.scaled_dot_product_attention(q[b : b + 1, :, pad], kb, vb, scale=scale)
    return out
