"""DiT: the Diffusion Transformer of Peebles & Xie ("Scalable Diffusion Models with Transformers", ICCV 2023),
with the attention injected.

The parameters are named and shaped as in facebookresearch/DiT ``models.py`` (``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``pos_embed``, ``blocks.{i}.{norm1,attn,norm2,mlp,
adaLN_modulation}``, ``final_layer``), so an original DiT checkpoint loads unchanged into ``DiT_XL_2()``
(675,129,632 parameters counting the frozen positional embedding). Two departures, both off by default:

- ``attention=`` picks the attention layer: a method name for :class:`difattn.nn.Attention` (``"dense"``,
  ``"clear"``, ``"grat"``, ``"pisa"``, ``"llsa"``, ``"linear"``, ``"dydila"``), or any factory called as
  ``attention(hidden_size, num_heads, **attention_options)`` whose module runs ``forward(x, grid=grid)``.
- Inputs may be any ``H x W`` divisible by the patch (non-square too): the sin-cos positional embedding is
  computed for the input's grid, and every attention layer receives that grid. ``pos_embed="rope"`` replaces
  it by 2-D RoPE inside attention (the pixel DiT).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .._attention_module import METHODS
from .._checks import check_choice
from .._rope import rope_2d
from ..nn import Attention
from ..grid import TokenGrid


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for patches, timesteps and class labels        #
#################################################################################


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, D)`` tokens in raster order (timm's ``PatchEmbed`` parameter names)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """``(B,)`` (possibly fractional) timesteps -> ``(B, dim)`` features ``[cos(t f), sin(t f)]``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1) if dim % 2 else embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with ``dropout_prob > 0`` an extra row is the "no class" label of
    classifier-free guidance, and labels are dropped to it at that rate during training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Mlp(nn.Module):
    """timm's ``Mlp`` as DiT uses it: ``fc1``, tanh-GELU, ``fc2``."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_attention(
    attention: str | Callable[..., nn.Module],
    hidden_size: int,
    num_heads: int,
    qk_norm: bool | str,
    attention_options: dict[str, Any] | None,
    process_group: Any = None,
) -> nn.Module:
    """The attention layer of a block: :class:`difattn.nn.Attention` for a method name, else the factory's module."""
    options = dict(attention_options or {})
    if isinstance(attention, str):
        check_choice("attention", attention, METHODS)
        return Attention(hidden_size, num_heads, method=attention, qkv_bias=True, qk_norm=qk_norm,
                         process_group=process_group, **options)
    if not callable(attention):
        raise TypeError(f"attention must be a method name or a module factory, got {type(attention).__name__}")
    if qk_norm:
        raise ValueError("qk_norm applies to difattn.nn.Attention; configure a custom attention factory directly")
    if process_group is not None:
        raise ValueError("process_group applies to difattn.nn.Attention; give a custom attention factory its own")
    return attention(hidden_size, num_heads, **options)


def choose_attention(
    attention: str | Callable[..., nn.Module],
    attention_options: dict[str, Any] | None,
    method: str | None,
    method_options: dict[str, Any],
) -> tuple[str | Callable[..., nn.Module], dict[str, Any] | None]:
    """The model's attention and its options from either spelling: ``method="clear", radius=8`` (as
    :class:`difattn.nn.Attention` and ``difattn.diffusers.apply`` take them; ``method`` replaces ``attention``) or
    ``attention="clear", attention_options={"radius": 8}`` (which also takes a module factory)."""
    if method is not None:
        if not isinstance(method, str):
            raise TypeError(f"method must be a method name (a factory goes to attention=), got {type(method).__name__}")
        attention = method
    if method_options:
        if attention_options is not None:
            raise ValueError(f"attention_options: given together with keyword options {sorted(method_options)}; "
                             "pass the method's options one way")
        attention_options = dict(method_options)
    return attention, attention_options


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning: ``x += gate * f(modulate(norm(x), shift, scale))`` for f in
    (attention, MLP), the six modulation vectors regressed from the conditioning ``c``."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        attention: str | Callable[..., nn.Module] = "dense",
        attention_options: dict[str, Any] | None = None,
        qk_norm: bool | str = False,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = make_attention(attention, hidden_size, num_heads, qk_norm, attention_options, process_group)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        grid: TokenGrid,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn_in = modulate(self.norm1(x), shift_msa, scale_msa)
        attn_out = self.attn(attn_in, grid=grid) if rope is None else self.attn(attn_in, grid=grid, rope=rope)
        x = x + gate_msa.unsqueeze(1) * attn_out
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its ``p x p x C`` patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Args (the original's, then difattn's, keyword-only):
        input_size: latent side, or ``(height, width)``; sets the stored positional embedding. Other sizes
            divisible by the patch work at run time.
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob, num_classes,
        learn_sigma: as in DiT (``learn_sigma`` doubles the output channels).
        attention: method name or attention factory (module docstring); attention_options: its options.
        method, **method_options: the same choice as :class:`difattn.nn.Attention` and ``difattn.diffusers.apply``
            spell it, ``DiT_XL_2(method="clear", radius=8)``; ``method`` replaces ``attention``, and the keyword
            options replace ``attention_options`` (giving both is a ``ValueError``).
        qk_norm: q/k norm of :class:`difattn.nn.Attention` (``"rms_norm"`` for the pixel DiT).
        pos_embed: ``"sincos"`` (DiT's fixed 2-D embedding, a frozen parameter) or ``"rope"`` (2-D RoPE).
        process_group: None, or a ``ProcessGroup`` / 1-D ``DeviceMesh`` to run the blocks sequence-parallel:
            every rank takes the same inputs and returns the same output; in between each holds its stripe of
            token rows (:mod:`difattn.distributed`), and attention is exact. Parameter gradients are each rank's
            share: sum them over the group (e.g. data-parallel over it). Needs at least one token row per rank.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        attention: str | Callable[..., nn.Module] = "dense",
        attention_options: dict[str, Any] | None = None,
        qk_norm: bool | str = False,
        pos_embed: str = "sincos",
        process_group: Any = None,
        method: str | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        attention, attention_options = choose_attention(attention, attention_options, method, method_options)
        if pos_embed not in ("sincos", "rope"):
            raise ValueError(f"pos_embed must be 'sincos' or 'rope', got {pos_embed!r}")
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        self.learn_sigma, self.in_channels = learn_sigma, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.num_heads = patch_size, num_heads
        self.grid_size = (height // patch_size, width // patch_size)
        self._group = None
        if process_group is not None:
            from ..distributed._comm import SharedGroup

            self._group = SharedGroup(process_group)  # copy.deepcopy (EMA) shares the group instead of copying it

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if pos_embed == "sincos":  # fixed, but a parameter (requires_grad=False) as in DiT's checkpoints
            tokens = self.grid_size[0] * self.grid_size[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size), requires_grad=False)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden_size, num_heads, mlp_ratio=mlp_ratio, attention=attention,
                attention_options=attention_options, qk_norm=qk_norm, process_group=process_group,
            )
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def process_group(self) -> Any:
        """The process group the blocks run sequence-parallel over, or None."""
        return None if self._group is None else self._group.group

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed is not None:
            sincos = sincos_pos_embed_2d(self.pos_embed.shape[-1], *self.grid_size, device=self.pos_embed.device)
            self.pos_embed.data.copy_(sincos.unsqueeze(0))
        # Patch embedding like nn.Linear (not nn.Conv2d's default):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """``(B, h*w, p*p*C)`` -> ``(B, C, h*p, w*p)``."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid.height, grid.width, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid.height * p, grid.width * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` images or latents; ``t``: ``(B,)`` timesteps; ``y``: ``(B,)`` class labels.
        Returns ``(B, out_channels, H, W)``."""
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"x: height and width must be divisible by patch_size={self.patch_size}, got {H}x{W}")
        grid = TokenGrid(H // self.patch_size, W // self.patch_size)
        x = self.x_embedder(x)  # (B, N, D), N = H * W / p**2
        rope = None
        if self.pos_embed is None:
            rope = rope_2d(grid, x.shape[-1] // self.num_heads, device=x.device)
        elif (grid.height, grid.width) == self.grid_size:
            x = x + self.pos_embed
        else:
            x = x + sincos_pos_embed_2d(x.shape[-1], grid.height, grid.width, device=x.device).to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        if self.process_group is not None:  # this rank's rows of tokens (and of the RoPE tables) from here on
            from .. import distributed

            x = distributed.shard(x, grid, process_group=self.process_group)
            if rope is not None:
                rope = tuple(distributed.shard(table, grid, process_group=self.process_group) for table in rope)
        for block in self.blocks:
            x = block(x, c, grid, rope)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p * p * out_channels)
        if self.process_group is not None:
            x = distributed.gather(x, grid, process_group=self.process_group)
        return self.unpatchify(x, grid)  # (B, out_channels, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on a batch ``[conditional half, unconditional half]`` (labels of the second
        half are the "no class" label). Guides the first ``in_channels`` output channels (the noise or velocity
        prediction; the original guides 3 by default to reproduce its paper) and passes the rest through."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        pred, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond, uncond = pred.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def sincos_pos_embed_2d(
    embed_dim: int, height: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(height*width, embed_dim)`` fixed 2-D embedding of raster-ordered tokens, as DiT builds it: the first
    half encodes the column, the second half the row (1-D ``[sin, cos]`` embeddings, frequencies
    ``10000**(-i / (D/4))``). Equals DiT's numpy version for square grids."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    return torch.cat(
        [_sincos_1d(embed_dim // 2, cols.reshape(-1)), _sincos_1d(embed_dim // 2, rows.reshape(-1))], dim=1
    ).float()


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    exponents = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2)
    omega = 1.0 / 10000**exponents
    angles = positions[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################


def DiT_XL_2(**kwargs: Any) -> DiT:
    """DiT-XL/2 (Peebles & Xie, 2023): depth 28, width 1152, 16 heads, patch 2; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_XL_4(**kwargs: Any) -> DiT:
    """DiT-XL/4 (Peebles & Xie, 2023): depth 28, width 1152, 16 heads, patch 4; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def DiT_XL_8(**kwargs: Any) -> DiT:
    """DiT-XL/8 (Peebles & Xie, 2023): depth 28, width 1152, 16 heads, patch 8; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def DiT_L_2(**kwargs: Any) -> DiT:
    """DiT-L/2 (Peebles & Xie, 2023): depth 24, width 1024, 16 heads, patch 2; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def DiT_L_4(**kwargs: Any) -> DiT:
    """DiT-L/4 (Peebles & Xie, 2023): depth 24, width 1024, 16 heads, patch 4; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def DiT_L_8(**kwargs: Any) -> DiT:
    """DiT-L/8 (Peebles & Xie, 2023): depth 24, width 1024, 16 heads, patch 8; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def DiT_B_2(**kwargs: Any) -> DiT:
    """DiT-B/2 (Peebles & Xie, 2023): depth 12, width 768, 12 heads, patch 2; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def DiT_B_4(**kwargs: Any) -> DiT:
    """DiT-B/4 (Peebles & Xie, 2023): depth 12, width 768, 12 heads, patch 4; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def DiT_B_8(**kwargs: Any) -> DiT:
    """DiT-B/8 (Peebles & Xie, 2023): depth 12, width 768, 12 heads, patch 8; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def DiT_S_2(**kwargs: Any) -> DiT:
    """DiT-S/2 (Peebles & Xie, 2023): depth 12, width 384, 6 heads, patch 2; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def DiT_S_4(**kwargs: Any) -> DiT:
    """DiT-S/4 (Peebles & Xie, 2023): depth 12, width 384, 6 heads, patch 4; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def DiT_S_8(**kwargs: Any) -> DiT:
    """DiT-S/8 (Peebles & Xie, 2023): depth 12, width 384, 6 heads, patch 8; ``kwargs`` go to
    :class:`DiT` (``input_size``, ``num_classes``, ``attention``, ``attention_options``, ...)."""
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
