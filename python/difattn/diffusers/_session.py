"""What ``apply`` leaves on a transformer: the method, the dense schedule and the geometry of the current call."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .._methods import SparseMethod
from .._options import clear_proportional_scale
from . import _compiled
from ._families import Family, Geometry


class Session:
    """State shared by the difattn processors of one transformer.

    A forward pre-hook (:meth:`observe`) reads every call's geometry from the transformer's arguments, so the
    resolution, frame count and prompt length may change from call to call. Denoising steps are counted from
    ``timestep``: a call with a smaller timestep than the previous one starts the next step, an equal one
    belongs to the same step (classifier-free guidance run as a second call), a larger one starts a new
    generation at step 0.

    Under ``torch.compile`` the step is counted when the graph runs (:func:`._compiled.denoising_step`), and
    ``step_tensor`` holds it for the layers' ops.

    ``backend`` is difattn's registered dispatcher backend (None where diffusers' registry cannot be used) and
    ``native`` diffusers' SDPA backend (None without a dispatcher); both are looked up once, at ``apply`` time.
    ``proportional``: the training sequence length CLEAR's proportional attention scales from, or None.
    """

    def __init__(
        self,
        transformer: nn.Module,
        family: Family,
        method: str,
        spec: SparseMethod | None,
        options: dict[str, Any],
        *,
        down_factor: int | None,
        proportional: int | None = None,
        dense_layers: frozenset[int],
        dense_steps: int,
        parallel: str = "auto",
        backend: Any,
        native: Any,
    ) -> None:
        self.family, self.method, self.spec, self.options = family, method, spec, options
        self.parallel = parallel  # the difattn.distributed scheme under context parallelism
        self.down_factor, self.dense_layers, self.dense_steps = down_factor, dense_layers, dense_steps
        self.proportional = proportional
        self.backend, self.native = backend, native
        self.step = 0
        self.step_tensor: torch.Tensor | None = None
        self.key = _compiled.register(self, f"session of {type(transformer).__name__}")
        self._last_timestep: float | None = None
        self._geometry: Geometry | None = None
        self._geometry_error: Exception | None = None
        self._signature = inspect.signature(transformer.forward)
        self.hook = transformer.register_forward_pre_hook(self.observe, with_kwargs=True)

    def observe(self, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward pre-hook: record this call's geometry and denoising step."""
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        try:
            self._geometry, self._geometry_error = self.family.geometry(transformer, arguments), None
        except Exception as err:  # raised again by geometry() if a difattn layer needs it
            self._geometry, self._geometry_error = None, err
        if not self.dense_steps:
            return
        timestep = arguments.get("timestep")
        if timestep is None:
            raise ValueError("dense_steps needs the transformer's timestep argument to count denoising steps")
        if torch.compiler.is_compiling():
            self.step_tensor = _compiled.denoising_step(self, timestep)
        else:
            self.count_step(timestep)

    def count_step(self, timestep: Any) -> None:
        """Advance :attr:`step` by this call's ``timestep`` (see the class docstring)."""
        t = float(torch.as_tensor(timestep).detach().float().max())
        if self._last_timestep is None or t > self._last_timestep:
            self.step = 0
        elif t < self._last_timestep:
            self.step += 1
        self._last_timestep = t

    def geometry(self) -> Geometry:
        """The current call's geometry; ``ValueError`` when it could not be read."""
        if self._geometry is None:
            reason = self._geometry_error or "the transformer has not been called (difattn layers need its forward)"
            raise ValueError(f"difattn could not read the token geometry of this call: {reason}") from (
                self._geometry_error
            )
        return self._geometry

    def scale(self, num_tokens: int, head_dim: int, given: float | None) -> float | None:
        """The attention scale of a call over ``num_tokens`` (the whole sequence): CLEAR's proportional attention's
        when it is on (it replaces the model's, as the released processors do), else the model's ``given``."""
        if self.proportional is None:
            return given
        return clear_proportional_scale(num_tokens, head_dim, self.proportional, self.down_factor is not None)

    def runs_dense(self, index: int) -> bool:
        """Whether layer ``index`` runs the stock processor in the current call (under ``torch.compile``, the
        dense steps are left to the layer's op, which sees the step of the call)."""
        if self.spec is None or index in self.dense_layers:
            return True
        return not torch.compiler.is_compiling() and self.step < self.dense_steps
