"""difattn in diffusers pipelines: swap a transformer's attention for CLEAR, GRAT, PISA or LLSA.

```python
import difattn.diffusers
pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
summary = difattn.diffusers.apply(pipe.transformer, "clear", radius=16)       # every attention layer
difattn.diffusers.apply(pipe.transformer, "pisa", density=0.15, routing_bias=True, dense_layers=range(4))
image = pipe("a cat", height=2048, width=2048).images[0]
difattn.diffusers.remove(pipe.transformer)                                    # the stock processors again
```

Supported transformers (by class, subclasses included), with the side the text takes in joint attention:

- images: ``FluxTransformer2DModel``, ``Flux2Transformer2DModel`` and ``ChromaTransformer2DModel`` (double- and
  single-stream blocks, text first, grid from ``img_ids``); ``QwenImageTransformer2DModel`` (text first, grid from
  ``img_shapes``); ``SD3Transformer2DModel`` (text last; SD3.5's second, image-only attention too);
  ``CogView4Transformer2DModel`` and ``AuraFlowTransformer2DModel`` (text first; AuraFlow's register tokens count
  as text); ``HunyuanImageTransformer2DModel`` (text last); ``DiTTransformer2DModel`` and
  ``PixArtTransformer2DModel`` (self-attention only; cross-attention is untouched);
- videos: ``WanTransformer3DModel``, ``SkyReelsV2Transformer3DModel``, ``ChronoEditTransformer3DModel`` and
  ``WanVACETransformer3DModel`` (its VACE blocks too), ``LTXVideoTransformer3DModel`` and
  ``AllegroTransformer3DModel`` (video self-attention only); ``HunyuanVideoTransformer3DModel``,
  ``HunyuanVideo15Transformer3DModel`` and ``MochiTransformer3DModel`` (text last; padded text becomes GRAT's
  ``text_mask``, and the other methods drop padded text keys); ``CogVideoXTransformer3DModel`` (text first).

``SanaTransformer2DModel`` is recognised but has nothing to replace (its self-attention is linear attention
already, its other layers attend to the text), so ``apply`` raises for it. The tests run tiny random models of
every family on diffusers 0.42.1 and 0.35.2 (where it has the model).

Context parallelism: ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` (or
``ring_degree``), before or after ``apply``, splits the sequence over the processes with the model's ``_cp_plan``
(FLUX and Wan have one in diffusers 0.42). difattn's layers then run :mod:`difattn.distributed`'s exact schemes on
the shards (``parallel=`` picks one) instead of diffusers' ring/Ulysses attention, which cannot be exact for a
local method (see ``_processor.py``); dense layers keep diffusers' own. diffusers 0.42.1's ``enable_parallelism``
divides by ``torch.accelerator.device_count()`` and so fails on machines without an accelerator.

The token geometry (frames, height, width, text length) is read from the transformer's arguments on every
call, so resolution and prompt length may change between calls. Each layer keeps the model's own processor for
projections, norms and RoPE and replaces only its self-attention call (see ``_processor.py``).

``torch.compile(transformer, fullgraph=True)`` works after ``apply``: under compile each layer's attention call
is one opaque custom op that runs the method eagerly (see ``_compiled.py``), so the transformer recompiles only
when shapes change (a new resolution, frame count or prompt length).

``apply`` is the one way to enable difattn: it registers difattn with diffusers' attention dispatcher, logs what it
changed on the ``difattn`` logger (INFO) and returns an :class:`ApplySummary`. After ``apply``,
``transformer.set_attention_backend("difattn")`` and ``with attention_backend("difattn")`` are accepted too: the
layers ``apply`` set up run the method and every other attention call runs SDPA, as in the stock model.

CLEAR's global tokens (``down_factor=d``) add a learnable pooling weight per layer at
``<layer>.processor.spatial_weight``, shape ``(1, 1, 1, d, 1, d, 1)``, the parameter name and shape of the CLEAR
reference code, so its published FLUX checkpoints load with ``transformer.load_state_dict(sd, strict=False)``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from torch import nn

from .._checks import check_int
from .._methods import SPARSE_METHODS, check_options
from .._options import clear_proportional
from . import _dispatcher
from ._families import family_of
from ._processor import DifattnProcessor, processor_class
from ._session import Session
from ._summary import ApplySummary

__all__ = ["apply", "remove", "attention_layers", "METHODS", "ApplySummary", "DifattnProcessor"]

logger = logging.getLogger(__name__)

METHODS = ("dense", "clear", "grat", "pisa", "llsa")
PARALLEL = ("auto", "ulysses", "halo")
_SESSION = "_difattn_session"


def attention_layers(transformer: nn.Module) -> list[str]:
    """Names of the attention layers difattn handles, in execution order; ``dense_layers`` indexes this list.

    FLUX, Flux2, Chroma, HunyuanVideo, HunyuanImage: ``transformer_blocks.{i}.attn`` then
    ``single_transformer_blocks.{i}.attn``; SD3: ``transformer_blocks.{i}.attn`` (and ``.attn2`` in
    dual-attention blocks); QwenImage, HunyuanVideo 1.5: ``transformer_blocks.{i}.attn``; AuraFlow:
    ``joint_transformer_blocks.{i}.attn`` then ``single_transformer_blocks.{i}.attn``; Wan and its variants:
    ``blocks.{i}.attn1`` (after WanVACE's ``vace_blocks.{i}.attn1``); the others: ``transformer_blocks.{i}.attn1``.
    """
    return [name for name, _ in family_of(transformer).layers(transformer)]


def apply(
    transformer: nn.Module,
    method: str,
    *,
    dense_layers: Iterable[int | str] = (),
    dense_steps: int = 0,
    parallel: str = "auto",
    **method_options: Any,
) -> ApplySummary:
    """Run ``method`` in the attention layers of ``transformer`` (replacing any earlier ``apply``).

    Args:
        method: ``"clear"``, ``"grat"``, ``"pisa"``, ``"llsa"``, or ``"dense"`` (the stock processors, through
            the same hooks; a baseline).
        dense_layers: layers that stay dense, as indices into :func:`attention_layers` (negative ones count
            from the end) or as names from it.
        dense_steps: the first ``dense_steps`` denoising steps of every generation run dense (steps are
            counted from the ``timestep`` argument; see :class:`~difattn.diffusers._session.Session`).
        parallel: the scheme of :func:`difattn.distributed.attention` under diffusers' context parallelism:
            ``"auto"`` (the halo for CLEAR and GRAT neighbours where each rank's image tokens are whole rows of
            one frame and that moves fewer bytes, else Ulysses), ``"ulysses"`` or ``"halo"``. Every choice is
            exact; unused without context parallelism.
        **method_options: the method's options, as :mod:`difattn.functional` names them (``radius``,
            ``temporal_radius`` / ``group``, ``pattern``, ``reach`` / ``density``, ``block_size``, ``order``,
            ``routing_bias``, ``sink`` / ``block_size``, ``topk``, ``levels``, ``coarse_pooling``,
            ``token_weight``; ``backend`` for all), plus for CLEAR ``down_factor`` (learnable global tokens: the
            parameter ``<layer>.processor.spatial_weight`` of the released checkpoints, pooled as
            :func:`difattn.clear_global_kv`) and ``proportional_attention`` (the released high-resolution inference:
            ``True``, or the training sequence length ``T``, default 4608 = FLUX at 1024² with 512 text tokens, sets
            ``scale = sqrt(log_T(c·N) / head_dim)`` for a call of N tokens, ``c = 10`` with global tokens and 1
            without, as the released processors do). The grid, text mask and scale come from the model.

    Returns:
        An :class:`ApplySummary` of the layers replaced and kept dense; the same is logged (INFO) on the
        ``difattn.diffusers`` logger.
    """
    family = family_of(transformer)
    if not family.blocks:
        raise ValueError(f"{type(transformer).__name__}: difattn has no attention layer to replace: {family.no_layers}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    spec = SPARSE_METHODS.get(method)
    clear_only = {"down_factor", "proportional_attention"} if method == "clear" else set()
    allowed = frozenset() if spec is None else spec.options | clear_only
    options = check_options(method, method_options, allowed, frozenset() if spec is None else spec.required)
    given = dict(options)
    down_factor = options.pop("down_factor", None)
    if down_factor is not None:
        down_factor = check_int("down_factor", down_factor, minimum=1)
    proportional = clear_proportional(options.pop("proportional_attention", False))
    layers = family.layers(transformer)
    names = [name for name, _ in layers]
    dense = _layer_indices(dense_layers, names)
    check_int("dense_steps", dense_steps, minimum=0)
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(map(repr, PARALLEL))}; got {parallel!r}")

    remove(transformer)
    session = Session(
        transformer, family, method, spec, options,
        down_factor=down_factor if down_factor and down_factor > 1 else None, proportional=proportional,
        dense_layers=dense, dense_steps=dense_steps, parallel=parallel, backend=_dispatcher.register(),
        native=_native_backend(),
    )
    for index, (name, module) in enumerate(layers):
        original = module.processor
        processor = processor_class(type(original))(original, session, index, name)
        reference = next(module.parameters(), None)
        if reference is not None:
            processor.to(device=reference.device, dtype=reference.dtype)
        _set_processor(module, processor)
    setattr(transformer, _SESSION, session)
    _dispatcher.track(session)
    kept = dense if spec is not None else frozenset(range(len(names)))
    summary = ApplySummary(
        model=type(transformer).__name__, family=family.name, method=method, options=given,
        replaced=tuple(n for i, n in enumerate(names) if i not in kept),
        dense=tuple(n for i, n in enumerate(names) if i in kept),
        dense_steps=dense_steps, dispatcher=session.backend is not None,
    )
    logger.info("%s", summary)
    return summary


def remove(transformer: nn.Module) -> None:
    """Restore the processors ``apply`` replaced and drop its hook; a no-op on a transformer without difattn.

    Processors left on the ``"difattn"`` dispatcher backend (by ``set_attention_backend("difattn")``) go back to
    diffusers' default backend, since nothing runs difattn in them any more.
    """
    session = getattr(transformer, _SESSION, None)
    if session is None:
        return
    for _, module in session.family.layers(transformer):
        processor = getattr(module, "processor", None)
        if isinstance(processor, DifattnProcessor) and processor.session is session:
            _set_processor(module, processor.original)
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if _dispatcher.is_difattn(getattr(processor, "_attention_backend", None)):
            processor._attention_backend = None
    session.hook.remove()
    delattr(transformer, _SESSION)
    _dispatcher.untrack(session)
    logger.info("difattn: removed from %s; the stock attention processors are back", type(transformer).__name__)


def _set_processor(module: nn.Module, processor: Any) -> None:
    """``module.set_processor(processor)``; MochiAttention has no such method, only the attribute."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
        return
    if isinstance(getattr(module, "processor", None), nn.Module) and not isinstance(processor, nn.Module):
        del module._modules["processor"]
    module.processor = processor


def _native_backend() -> Any:
    try:
        return _dispatcher.native()
    except ImportError:  # a diffusers release without the attention dispatcher
        return None


def _layer_indices(dense_layers: Iterable[int | str], names: list[str]) -> frozenset[int]:
    if isinstance(dense_layers, (str, int)):
        raise TypeError("dense_layers must be an iterable of layer indices or names, e.g. range(4) or [0, 1]")
    indices = set()
    for entry in dense_layers:
        if isinstance(entry, str):
            if entry not in names:
                raise ValueError(f"dense_layers: no attention layer named {entry!r}; see attention_layers()")
            indices.add(names.index(entry))
        else:
            check_int("dense_layers entry", entry)
            if not -len(names) <= entry < len(names):
                raise ValueError(f"dense_layers: index {entry} is out of range for {len(names)} attention layers")
            indices.add(entry % len(names))
    return frozenset(indices)
