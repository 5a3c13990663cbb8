"""Structured, DiT-like attention inputs: q, k, v on a :class:`~difattn.TokenGrid` whose attention looks like a
trained diffusion transformer's (local heads, axial heads, long-range "segment" heads, attention sinks, text),
not like i.i.d. noise (where softmax attention is nearly flat and every sparse method looks terrible).

Everything is built in "logit units" and then scaled: with ``q = D^{1/4} q̃`` and ``k = D^{1/4} k̃`` the default
softmax scale ``D^{-1/2}`` gives logits ``ℓ(i, j) = q̃_i · k̃_j``; the models below are stated for ``ℓ``.

**Rotary positions with random frequencies.** The first ``P = max(1, ⌊D/4⌋)`` channel pairs of q and k are
positional. Pair ``m`` of an image token at position ``p = (t, y, x)`` holds a fixed unit vector ``c_m`` rotated by
the angle ``ω_m · p``, as in RoPE, with frequency vectors drawn ``ω_m ~ N(0, diag(ℓ_t⁻², ℓ⁻², ℓ⁻²))`` (the
"mixed-frequency" RoPE of vision transformers). A query and a key pair contribute ``cos(ω_m · (p_i − p_j))``, and
``E[cos(ω·Δ)] = exp(−½ Σ_a Δ_a² / ℓ_a²)``: over the pairs, ``(τ/P) Σ_m cos(ω_m·Δ) ≈ τ exp(−|Δ|²/2ℓ²)``, a
Gaussian kernel of the offset with a fluctuation of order ``τ/√P``. Text tokens are not rotated (FLUX and SD3
give text no position).

**Smooth random fields.** ``f(t, y, x) ∈ R^C``: white Gaussian noise on a padded grid convolved, along each axis,
with a normalised Gaussian of standard deviation ``λ`` tokens (``λ_t`` frames) and cut back to the grid, then
divided by the filter's norm, so every channel is a stationary unit-variance field with correlation
``exp(−|Δ|² / 4λ²)`` at any grid size (odd, video, tiny) without border effects.

**A shared latent.** In a transformer q, k and v are projections of the same hidden state, so their variations
are correlated (which is what PISA's first-order term uses). Each head draws a latent ``x_i ∈ R^D`` per image
token: the remaining ``D − 2P`` "content" channels of q and k are ``√(γ/D_c) x_i`` (unrotated: most of RoPE's
pairs turn by a tiny angle over a latent's extent), adding a content similarity ``≈ γ corr(x_i, x_j)``, and
``v_i = 0.8 x_i M + 0.6 g_i`` with a random signed permutation ``M`` and an own smooth field ``g`` (``λ_v``), plus ``0.3``
white noise.

Head kinds (assigned round-robin over the heads, parameters drawn per head from the seed):

- ``"local"``: positional pairs as above, ``x`` a smooth field of length ``2ℓ``: ``ℓ(i, j) ≈ τ exp(−|Δ|²/2ℓ²) +
  γ corr``. Locality length ``ℓ ∈ [1.5, 6]`` tokens (log-uniform), sharpness ``τ ∈ [6, 10]``, ``γ ∈ [1, 3]``:
  from tight to broad heads.
- ``"axial"``: as local, but each frequency vector has one non-zero axis (pairs split evenly over the axes), so
  the kernel is ``τ · mean_a exp(−Δ_a²/2ℓ_a²)``: a cross along the row and column of the query (and its
  frame axis in videos), the pattern axial RoPE produces; ``ℓ ∈ [1, 3]``, ``τ ∈ [5, 8]``.
- ``"global"``: no positional pairs. ``S = 6`` random unit directions ``μ_s``; every image token belongs to the
  segment ``s(i) = argmax_s h_s(p_i)`` of a smooth field ``h`` (``λ`` = a sixth of the larger side), blobs that
  cover the image like objects; ``x_i = √D μ_{s(i)}``, ``q̃_i = √(τ/D) x_i + σ ε``, ``k̃_j = √(τ/D) x_j + σ ε'``:
  ``ℓ ≈ τ`` inside a segment, ``≈ 0`` across, so a query spreads over its segment wherever it lies (long range),
  ``τ ∈ [3, 5]``.

On every head:

- **Sinks.** ``sinks`` image tokens per sample (the same for all heads, as massive activations are) get keys of
  high norm ``κ d`` along a per-head unit direction ``d``, and every query gets ``+d``: the logit of any query on a
  sink is ``κ = ln(N_image) + u``, ``u ∈ [−4, −1]``, so each sink takes a visible share of every row.
- **Text.** Text tokens have their own statistics: ``k̃ = √ρ e + 0.5 ε``, ``q̃ = √ρ e + ε`` with a per-head unit
  direction ``e`` and ``ρ ∈ [4, 8]`` (text attends mostly to text), and image queries get ``+ (η/√ρ) e`` so their
  logit on text is ``η ∈ [0.3 τ, 0.6 τ]`` (a share of each image row goes to the prompt). Text values are i.i.d.
  Gaussian.

Here ``ε`` are i.i.d. standard normals and ``σ = 0.1``. All draws come from ``torch.Generator(seed)`` in float64:
the same arguments give bit-identical tensors on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..grid import TokenGrid

HEAD_KINDS = ("local", "axial", "global")
_SIGMA = 0.1  # white noise on q and k of image tokens (neighbouring tokens of a model have similar keys)
_VALUE_LATENT, _VALUE_OWN, _VALUE_NOISE = 0.8, 0.6, 0.3  # v = 0.8 x M + 0.6 g + 0.3 ε
_SEGMENTS = 6
# Text keys vary less than text queries: an image query's text logit is η + (η/√ρ)·noise·N(0, 1).
_TEXT_KEY_NOISE = 0.5


@dataclass(frozen=True)
class HeadModel:
    """The drawn parameters of one head (lengths in tokens; see the module docstring for their roles)."""

    kind: str
    length: float  # ℓ (local, axial) or the segment field's λ (global)
    frame_length: float  # ℓ_t along frames
    sharpness: float  # τ
    content: float  # γ
    sink_logit: float  # κ
    text_logit: float  # η
    text_affinity: float  # ρ
    value_length: float  # λ_v


def head_models(grid: TokenGrid, heads: int, *, kinds: tuple[str, ...] = HEAD_KINDS, seed: int = 0) -> list[HeadModel]:
    """The parameters :func:`structured_qkv` draws for each head (kinds round-robin)."""
    if not kinds or any(kind not in HEAD_KINDS for kind in kinds):
        raise ValueError(f"kinds must be a non-empty tuple of {HEAD_KINDS}, got {kinds!r}")
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))

    out = []
    for h in range(heads):
        kind = kinds[h % len(kinds)]
        if kind == "local":
            length, sharpness = math.exp(uniform(math.log(1.5), math.log(6.0))), uniform(6.0, 10.0)
        elif kind == "axial":
            length, sharpness = math.exp(uniform(0.0, math.log(3.0))), uniform(5.0, 8.0)
        else:
            length, sharpness = max(grid.height, grid.width) / _SEGMENTS, uniform(3.0, 5.0)
        out.append(HeadModel(
            kind=kind, length=length, frame_length=uniform(0.7, 2.0), sharpness=sharpness, content=uniform(1.0, 3.0),
            sink_logit=math.log(grid.image_tokens) + uniform(-4.0, -1.0),
            text_logit=sharpness * uniform(0.3, 0.6), text_affinity=uniform(4.0, 8.0),
            value_length=uniform(1.0, 4.0),
        ))
    return out


def smooth_field(grid: TokenGrid, channels: int, length: float, frame_length: float, gen: torch.Generator) -> torch.Tensor:
    """``(image_tokens, channels)`` float64: a stationary unit-variance Gaussian field over the image tokens in
    raster order (white noise convolved with Gaussians of std ``length`` along y, x and ``frame_length`` along t)."""
    sides = (grid.frames, grid.height, grid.width)
    # A single frame needs no temporal filter (and no noise frames to feed one).
    kernels = [_gaussian_taps(frame_length) if grid.frames > 1 else None, _gaussian_taps(length), _gaussian_taps(length)]
    pads = [0 if w is None else len(w) // 2 for w in kernels]
    x = torch.randn(channels, *(n + 2 * p for n, p in zip(sides, pads)), generator=gen, dtype=torch.float64)
    for axis, (w, n) in enumerate(zip(kernels, sides), start=1):
        if w is not None:
            # The 'valid' convolution along this axis as a banded (n, n + 2·pad) matrix product.
            band = torch.zeros(n, n + len(w) - 1, dtype=torch.float64)
            for i in range(n):
                band[i, i : i + len(w)] = w
            x = (x.movedim(axis, -1) @ band.T).movedim(-1, axis)
    return x.reshape(channels, -1).T.contiguous()


def _gaussian_taps(std: float) -> torch.Tensor:
    """A Gaussian filter of ``std`` (3 std each side) scaled to unit L2 norm, so it keeps white noise's variance."""
    reach = max(1, math.ceil(3 * std))
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (offsets / std) ** 2)
    return w / w.norm()


def _unit(gen: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _rotate(u: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(2m, 2m+1)`` of ``u`` ``(n, 2P)`` by ``angles`` ``(n, P)``."""
    pairs = u.unflatten(1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos * pairs[..., 0] - sin * pairs[..., 1], sin * pairs[..., 0] + cos * pairs[..., 1]], -1).flatten(1)


def _frequencies(model: HeadModel, pairs: int, gen: torch.Generator) -> torch.Tensor:
    """``(P, 3)`` frequency vectors over (t, y, x): Gaussian in every axis (local) or in one axis each (axial)."""
    inverse_lengths = torch.tensor([1 / model.frame_length, 1 / model.length, 1 / model.length], dtype=torch.float64)
    omega = torch.randn(pairs, 3, generator=gen, dtype=torch.float64) * inverse_lengths
    if model.kind == "axial":
        axis = torch.arange(pairs) % 3
        omega = omega * torch.nn.functional.one_hot(axis, 3).to(torch.float64)
    return omega


def _image_qkv(model: HeadModel, grid: TokenGrid, D: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``q̃, k̃, v`` ``(image_tokens, D)`` of one head and sample, before sinks and text."""
    n = grid.image_tokens
    noise = lambda: _SIGMA * torch.randn(n, D, generator=gen, dtype=torch.float64)  # noqa: E731
    if model.kind == "global":
        segment = smooth_field(grid, _SEGMENTS, model.length, model.frame_length, gen).argmax(dim=1)
        latent = _unit(gen, _SEGMENTS, D)[segment] * math.sqrt(D)
        q, k = (latent * math.sqrt(model.sharpness / D) + noise() for _ in range(2))
    else:
        pairs = D // 4 if D >= 4 else D // 2
        latent = smooth_field(grid, D, 2 * model.length, 2 * model.frame_length, gen)
        carrier = _unit(gen, pairs, 2).flatten()
        angles = grid.image_coords().to(torch.float64) @ _frequencies(model, pairs, gen).T  # (n, P)
        content = latent[:, 2 * pairs :] * math.sqrt(model.content / max(D - 2 * pairs, 1))

        def project() -> torch.Tensor:
            positional = _rotate(carrier + noise()[:, : 2 * pairs], angles) * math.sqrt(model.sharpness / max(pairs, 1))
            return torch.cat([positional, content + noise()[:, 2 * pairs :]], dim=1)

        q, k = project(), project()
    # M: a random signed permutation (orthogonal, so x M keeps x's statistics).
    mixed = latent[:, torch.randperm(D, generator=gen)] * (2 * torch.randint(0, 2, (D,), generator=gen) - 1)
    own = smooth_field(grid, D, model.value_length, model.frame_length, gen)
    v = _VALUE_LATENT * mixed + _VALUE_OWN * own + _VALUE_NOISE * torch.randn(n, D, generator=gen, dtype=torch.float64)
    return q, k, v


def structured_qkv(
    grid: TokenGrid,
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    kinds: tuple[str, ...] = HEAD_KINDS,
    sinks: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiT-like ``q, k, v``, each ``(batch, heads, grid.num_tokens, head_dim)`` in ``dtype`` on ``device``, in the
    grid's sequence order (text first or last, image tokens in raster order). The model of each head kind is in
    the module docstring; heads share their drawn parameters over the batch, samples differ in every field, noise
    and sink position. Deterministic in ``seed``."""
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    for name, value, low in (("batch", batch, 1), ("heads", heads, 1), ("head_dim", head_dim, 1), ("sinks", sinks, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if sinks > grid.image_tokens:
        raise ValueError(f"sinks must be at most the {grid.image_tokens} image tokens, got {sinks}")
    models = head_models(grid, heads, kinds=kinds, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    N, D = grid.num_tokens, head_dim
    image, text = grid.image_range, grid.text_range
    q = torch.empty(batch, heads, N, D, dtype=torch.float64)
    k, v = torch.empty_like(q), torch.empty_like(q)
    for b in range(batch):
        sink_tokens = image.start + torch.randperm(grid.image_tokens, generator=gen)[:sinks]
        for h, model in enumerate(models):
            qi, ki, vi = _image_qkv(model, grid, D, gen)
            q[b, h, image.start : image.stop], k[b, h, image.start : image.stop] = qi, ki
            v[b, h, image.start : image.stop] = vi
            direction = _unit(gen, 2, D)  # sink direction d, text direction e
            q[b, h, image.start : image.stop] += direction[0] + model.text_logit / math.sqrt(model.text_affinity) * direction[1]
            k[b, h, sink_tokens] += model.sink_logit * direction[0]
            for x, noise in ((q, 1.0), (k, _TEXT_KEY_NOISE)):
                x[b, h, text.start : text.stop] = (math.sqrt(model.text_affinity) * direction[1]
                                                   + noise * torch.randn(len(text), D, generator=gen, dtype=torch.float64))
            v[b, h, text.start : text.stop] = torch.randn(len(text), D, generator=gen, dtype=torch.float64)
    gain = D**0.25
    return tuple(x.to(dtype=dtype, device=device) for x in (q * gain, k * gain, v))  # type: ignore[return-value]
