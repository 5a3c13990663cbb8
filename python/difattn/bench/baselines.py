"""What each method is compared with in the same run: dense SDPA, FlexAttention with the method's mask (raster and
tile order), NATTEN and flash-linear-attention when they are installed, and for PISA the keep-or-drop block-sparse
attention over the same selected blocks (time through FlexAttention, error against dense).

Every builder returns ``{json_key: fn}`` with ``fn(q, k, v, extra) -> out`` on ``(B, H, N, D)`` tensors, or an empty
dict when the baseline does not apply here; a missing optional package is never an error.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .. import backends, functional
from .._options import clear_radii
from ..testing import rel_error
from .cases import Case, Shape
from .quality import pisa_blocks

Fn = Callable[..., torch.Tensor]


def _compiled_flex(device: torch.device):
    """``torch.compile(flex_attention)``. On CPU, Inductor compiles in this process: its pool of compile workers
    starts by importing torch in each worker, which took CPU time from the kernels timed right after it."""
    from torch._inductor import config
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        config.compile_threads = 1
    return torch.compile(flex_attention, dynamic=False)


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's square-matmul rate in ``dtype`` (GFLOP/s): the ceiling the dense kernel's rate is read against.
    ``n = 2048`` on CPU, ``8192`` on CUDA; float64 and float32 run as themselves, half types on CPU as float32."""
    from .timing import time_call

    n = 8192 if device.type == "cuda" else 2048
    if device.type != "cuda" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = time_call(lambda i: a @ b, device, min_repeats=3, max_repeats=10, budget_s=1.0)
    return 2 * n**3 / (t.typical * 1e6)


def dense_fns(device: torch.device) -> dict[str, Fn]:
    """Dense SDPA: torch's CPU flash kernel; on CUDA the flash and the cuDNN backends, each timed on its own."""
    if device.type != "cuda":
        return {"dense_ms": lambda q, k, v, e: F.scaled_dot_product_attention(q, k, v)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(backend):
        def dense(q, k, v, e):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return dense

    return {"dense_flash_ms": with_backend(SDPBackend.FLASH_ATTENTION),
            "dense_cudnn_ms": with_backend(SDPBackend.CUDNN_ATTENTION)}


def flex_fns(case: Case, shape: Shape, device: torch.device) -> dict[str, Fn]:
    """FlexAttention with the case's mask in raster order and, for the block-engine methods, in tile order."""
    mask_mod = case.mask_mod(shape.grid, device)
    if mask_mod is None:
        return {}
    from torch.nn.attention.flex_attention import create_block_mask

    n = shape.grid.num_tokens
    flex = _compiled_flex(device)
    raster = create_block_mask(mask_mod, None, None, n, n, device=str(device))
    fns = {"flex_ms": lambda q, k, v, e: flex(q, k, v, block_mask=raster)}
    if case.method in ("clear", "grat"):
        plan = backends.block_plan_for(case.method, "triton", shape.grid, shape.head_dim, case.resolved_options(shape))
        perm = plan.q_perm.to(device)
        inv = torch.argsort(perm)
        tiled = create_block_mask(lambda b, h, qi, ki: mask_mod(b, h, perm[qi], perm[ki]), None, None, n, n,
                                  device=str(device))
        fns["flex_tiled_ms"] = lambda q, k, v, e: flex(
            q[:, :, perm], k[:, :, perm], v[:, :, perm], block_mask=tiled
        )[:, :, inv]
    return fns


def natten_fns(case: Case, shape: Shape, device: torch.device) -> dict[str, Fn]:
    """NATTEN's neighborhood attention for CLEAR on image-only grids, on CUDA (NATTEN's fused kernels are CUDA
    only; on CPU it would materialise every score): the square window of side ``2⌊r⌋ + 1`` (the disc's bounding
    square, shifted inwards at borders as NATTEN does), so it does about 4/π of CLEAR's pairs."""
    grid = shape.grid
    if (case.method != "clear" or grid.text_tokens or device.type != "cuda"
            or importlib.util.find_spec("natten") is None):
        return {}
    from natten.functional import na2d, na3d

    r, rt = clear_radii(grid, case.options["radius"], None)
    side = 2 * math.floor(r) + 1
    if side > min(grid.height, grid.width) or (grid.frames > 1 and 2 * rt + 1 > grid.frames):
        return {}
    spatial = (grid.frames, grid.height, grid.width) if grid.frames > 1 else (grid.height, grid.width)
    kernel = (2 * rt + 1, side, side) if grid.frames > 1 else (side, side)
    na = na3d if grid.frames > 1 else na2d

    def natten(q, k, v, e):
        B, H, N, D = q.shape
        heads_last = [x.transpose(1, 2).reshape(B, *spatial, H, x.shape[-1]) for x in (q, k, v)]
        out = na(*heads_last, kernel_size=kernel)
        return out.reshape(B, N, H, -1).transpose(1, 2)

    return {"natten_ms": natten}


def fla_fns(case: Case, device: torch.device) -> dict[str, Fn]:
    """flash-linear-attention's chunked linear attention (CUDA only; it is causal, so it does about half the
    state work of our non-causal kernel plus the intra-chunk products)."""
    if case.method != "linear" or device.type != "cuda" or importlib.util.find_spec("fla") is None:
        return {}
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return {}
    heads_first = "head_first" in inspect.signature(chunk_linear_attn).parameters
    normalize = case.options.get("normalize", True)

    def fla(q, k, v, e):
        fq, fk = e[4], e[5]
        if heads_first:
            return chunk_linear_attn(fq, fk, v, scale=1.0, normalize=normalize, head_first=True)[0]
        args = [x.transpose(1, 2) for x in (fq, fk, v)]
        return chunk_linear_attn(*args, scale=1.0, normalize=normalize)[0].transpose(1, 2)

    return {"fla_ms": fla}


def pisa_keep_only(case: Case, shape: Shape, q, k, v, backend: str):
    """The blocks PISA selects on these inputs, as mask pieces of the keep-or-drop baseline (attention over the
    selected blocks only): ``token_block (N,)``, each raster token's block id, and ``selected (B, H, M, M)``,
    whether query block i keeps key block j."""
    _, blocks = functional.pisa_attention(q, k, v, grid=shape.grid, backend=backend, return_blocks=True,
                                          **case.options)
    selected, token_block = pisa_blocks(blocks, shape.grid, shape.grid.num_tokens, case.options["block_size"])
    return token_block, selected


def keep_only_error(q, k, v, token_block, selected, dense_out) -> float:
    """Relative error against dense of attention restricted to the selected blocks (materialises the mask)."""
    mask = selected[:, :, token_block][:, :, :, token_block]
    with torch.no_grad():
        return rel_error(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), dense_out)


def keep_only_flex(token_block, selected, n: int, device: torch.device) -> dict[str, Fn]:
    """FlexAttention over PISA's selected blocks (the keep-or-drop baseline's time)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return selected[b, h, token_block[qi], token_block[ki]]

    B, H = selected.shape[:2]
    flex = _compiled_flex(device)
    block_mask = create_block_mask(mask_mod, B, H, n, n, device=str(device))
    return {"drop_ms": lambda q, k, v, e: flex(q, k, v, block_mask=block_mask)}
