"""What ``apply`` changed, as an object to inspect and as the line it logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ApplySummary:
    """The result of :func:`difattn.diffusers.apply`.

    Attributes:
        model: the transformer's class name; ``family``: the difattn family it was recognised as.
        method: the method; ``options``: its options as given (``backend``, ``down_factor`` included).
        replaced: the attention layers that run ``method`` (names as in ``attention_layers()``).
        dense: the attention layers kept on the stock processor (``dense_layers``, or every layer for
            ``method="dense"``).
        dense_steps: the first denoising steps that run dense in every layer.
        dispatcher: whether the layers that call diffusers' attention dispatcher reach difattn through its
            registered ``"difattn"`` backend (True) or through SDPA interception (False).
    """

    model: str
    family: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    replaced: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    dense_steps: int = 0
    dispatcher: bool = False

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        total = len(self.replaced) + len(self.dense)
        text = f"difattn: {self.method}({options}) in {len(self.replaced)} of {total} attention layers of {self.model}"
        if self.dense and self.replaced:
            text += f"; kept dense: {', '.join(self.dense)}"
        if self.dense_steps:
            text += f"; the first {self.dense_steps} denoising steps run dense"
        return text
