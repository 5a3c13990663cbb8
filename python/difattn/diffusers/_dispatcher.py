"""difattn as a backend of diffusers' attention dispatcher (``dispatch_attention_fn``).

The dispatcher's registry (``_AttentionBackendRegistry``, keyed by members of the ``AttentionBackendName`` enum)
is private, so difattn registers itself only on diffusers releases whose registry it knows (``_TESTED``) and
only when the registry still looks the way it expects; everywhere else :func:`register` returns None and the
processors intercept SDPA instead (see :mod:`._processor`).

``apply()`` registers the backend, so from then on diffusers knows the name ``"difattn"``:
``transformer.set_attention_backend("difattn")`` and ``with attention_backend("difattn")`` are accepted. The
backend runs the method only inside the layers ``apply()`` set up (the :class:`~._processor.LayerAttention` a
difattn processor makes :func:`active` for its call); every other attention call that reaches it (cross-attention,
layers kept dense) runs diffusers' native SDPA backend, as the stock model would. With no transformer set up by
``apply()`` left in the process, it raises and says what to call.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from typing import Any, Iterator

import torch

_TESTED = ((0, 35), (0, 42))  # first and last diffusers minor releases this registry layout was tested on
BACKEND_NAME = "difattn"


class _Active(threading.local):
    """The layer whose call is running in this thread (a thread-local, not a ``ContextVar``: ``torch.compile``
    traces attribute stores on it, and cannot trace ``ContextVar.set``). Set in ``__init__`` (run once per
    thread) so the attribute is always in the instance dict: compiled graphs guard on that."""

    def __init__(self) -> None:
        self.layer: Any = None


_ACTIVE = _Active()
_SESSIONS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # live apply() sessions: the backend is usable while any is
_MEMBER: list[Any] = []  # the registered enum member, once registered


def tested_range() -> str:
    return f"{_TESTED[0][0]}.{_TESTED[0][1]} to {_TESTED[1][0]}.{_TESTED[1][1]}"


def _version() -> tuple[int, int] | None:
    import diffusers

    match = re.match(r"(\d+)\.(\d+)", diffusers.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _dispatch_module() -> Any:
    """diffusers' ``attention_dispatch`` module when its registry has the known layout, else None."""
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
    return dispatch


def register() -> Any:
    """Register the ``"difattn"`` backend (once); returns its ``AttentionBackendName`` member, or None where the
    registry cannot be used. Called by ``apply()``."""
    if _MEMBER:
        return _MEMBER[0]
    dispatch = _dispatch_module()
    if dispatch is None:
        return None
    names = dispatch.AttentionBackendName
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # An enum member outside the class body. The dispatcher needs its value and type; set_attention_backend()
        # checks the name against AttentionBackendName.__members__, which is _member_map_.
        member = str.__new__(names, BACKEND_NAME)
        member._name_, member._value_ = BACKEND_NAME.upper(), BACKEND_NAME
        names._value2member_map_[BACKEND_NAME] = member
        names._member_map_[BACKEND_NAME.upper()] = member
    dispatch._AttentionBackendRegistry.register(member, constraints=[])(_difattn_attention)
    _MEMBER.append(member)
    return member


def native() -> Any:
    """The dispatcher's native (SDPA) backend member."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


def track(session: Any) -> None:
    """Count ``session`` as live (the backend serves transformers while one is)."""
    _SESSIONS.add(session)


def untrack(session: Any) -> None:
    """Forget ``session``; with none left, diffusers' active backend goes back to native if it was difattn."""
    _SESSIONS.discard(session)
    if _SESSIONS or not _MEMBER:
        return
    registry = _dispatch_module()._AttentionBackendRegistry
    if registry._active_backend is _MEMBER[0]:
        registry.set_active_backend(native())


def is_difattn(backend: Any) -> bool:
    """Whether ``backend`` (a processor's ``_attention_backend``) is the registered difattn member."""
    return bool(_MEMBER) and backend is _MEMBER[0]


@contextlib.contextmanager
def active(layer: Any) -> Iterator[None]:
    """Make ``layer`` the attention that the difattn backend runs, for the duration of the block."""
    previous, _ACTIVE.layer = _ACTIVE.layer, layer
    try:
        yield
    finally:
        _ACTIVE.layer = previous


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
    layer = _ACTIVE.layer
    if layer is None:
        if not _SESSIONS:
            raise RuntimeError(
                "the 'difattn' attention backend runs only in transformers set up by "
                "difattn.diffusers.apply(transformer, method, **options), and none is set up now; call apply() (it "
                "registers the backend and chooses the method), or pick another backend, e.g. "
                "transformer.set_attention_backend('native')"
            )
        # Outside difattn's layers (cross-attention, layers kept dense): what the stock model computes.
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # parallel_config only where set: diffusers 0.35's dispatch_attention_fn has no such parameter.
        parallel = {} if _parallel_config is None else {"parallel_config": _parallel_config}
        return dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, backend=native(), **parallel,
        )
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    context_parallel = getattr(_parallel_config, "context_parallel_config", None) is not None
    out = layer(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        parallel_config=_parallel_config if context_parallel else None,
    )
    return out.transpose(1, 2)
