"""Tensors as the compiled core receives them: ``(data_ptr, dtype name, shape, strides in elements)``.

The core validates every descriptor (null pointer, alignment, strides, offsets that fit) before it reads or writes
through it. A descriptor does not keep its tensor alive: the caller holds the tensor until the core returns.
"""

from __future__ import annotations

import torch

TensorDesc = tuple[int, str, list[int], list[int]]


def tensor_desc(t: torch.Tensor) -> TensorDesc:
    """The descriptor of ``t`` (any strides, any device the core can address: CPU)."""
    return (t.data_ptr(), str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()))


def optional_desc(t: torch.Tensor | None) -> TensorDesc | None:
    """:func:`tensor_desc`, or None for an absent tensor."""
    return None if t is None else tensor_desc(t)
