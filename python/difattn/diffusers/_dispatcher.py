"""difattn as a backend of diffusers' attention dispatcher (``dispatch_attention_fn``).

The dispatcher's registry (``_AttentionBackendRegistry``, keyed by members of the ``AttentionBackendName`` enum)
is private, so difattn registers itself only on diffusers releases whose registry it knows (``_TESTED``) and
only when the registry still looks the way it expects; everywhere else :func:`backend` returns None and the
processors intercept SDPA instead (see :mod:`._processor`). The backend is not meant to be selected by name:
it runs the :class:`~._processor.LayerAttention` that a difattn processor makes :func:`active` for its call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from typing import Any, Iterator

import torch

_TESTED = ((0, 35), (0, 42))  # first and last diffusers minor releases this registry layout was tested on
BACKEND_NAME = "difattn"

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("difattn_layer_attention", default=None)


def tested_range() -> str:
    return f"{_TESTED[0][0]}.{_TESTED[0][1]} to {_TESTED[1][0]}.{_TESTED[1][1]}"


def _version() -> tuple[int, int] | None:
    import diffusers

    match = re.match(r"(\d+)\.(\d+)", diffusers.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else None


@functools.cache
def backend() -> Any:
    """The registered ``AttentionBackendName`` for difattn, or None where the registry cannot be used."""
    version = _version()
    if version is None or not _TESTED[0] <= version <= _TESTED[1]:
        return None
    try:
        from diffusers.models import attention_dispatch as dispatch
    except ImportError:
        return None
    registry = getattr(dispatch, "_AttentionBackendRegistry", None)
    names = getattr(dispatch, "AttentionBackendName", None)
    if registry is None or names is None or not isinstance(getattr(registry, "_backends", None), dict):
        return None
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # An enum member outside the class body: the registry and the dispatcher only need its value and type.
        member = str.__new__(names, BACKEND_NAME)
        member._name_, member._value_ = BACKEND_NAME.upper(), BACKEND_NAME
        names._value2member_map_[BACKEND_NAME] = member
    registry.register(member, constraints=[])(_difattn_attention)
    return member


@functools.cache
def native() -> Any:
    """The dispatcher's native (SDPA) backend, which the interception route relies on."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


@contextlib.contextmanager
def active(layer: Any) -> Iterator[None]:
    """Make ``layer`` the attention that the difattn backend runs, for the duration of the block."""
    token = _ACTIVE.set(layer)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _difattn_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """The registered backend: dispatcher layout ``(B, N, H, D)`` in and out. Under context parallelism
    (``_parallel_config``) the tensors are this rank's shard and the layer runs difattn's own exact schemes."""
    layer = _ACTIVE.get()
    if layer is None:
        raise RuntimeError(
            "the 'difattn' attention backend only runs inside layers set up by difattn.diffusers.apply(); "
            "use that instead of set_attention_backend('difattn')"
        )
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    context_parallel = getattr(_parallel_config, "context_parallel_config", None) is not None
    out = layer(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        parallel_config=_parallel_config if context_parallel else None,
    )
    return out.transpose(1, 2)
