"""difattn.nn.Attention: timm-compatible parameters, every method, grid inference, exactness against dense."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import difattn
from difattn import TokenGrid, reference
from difattn._attention_module import METHODS
from difattn._rope import apply_rope, rope_2d
from difattn.nn import Attention
from difattn.testing import assert_close

DIM, HEADS = 32, 4
TIMM_KEYS = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}

# Options under which each sparse method must equal dense attention on any grid used here.
EXACT = {
    "clear": {"radius": 100.0},
    "grat": {"group": (64, 64)},
    "pisa": {"density": 1.0, "block_size": 16},
}
SPARSE = {
    "clear": {"radius": 2.0},
    "grat": {"group": (2, 2)},
    "pisa": {"density": 0.25, "block_size": 4},
    "llsa": {"block_size": 4, "topk": 2},
}
ANY = {"dense": {}, **SPARSE, "linear": {}, "dydila": {}}


def _x(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def _module(method: str = "dense", seed: int = 0, **options) -> Attention:
    """DiT's attention layer: qkv with bias, as facebookresearch/DiT builds timm's Attention."""
    torch.manual_seed(seed)
    return Attention(DIM, HEADS, method=method, **{"qkv_bias": True, **options})


def _timm_attention(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm's Attention.forward as DiT runs it, written out: qkv split as (3, heads, head_dim)."""
    B, N, C = x.shape
    qkv = module.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    attn = (q * (C // HEADS) ** -0.5) @ k.transpose(-2, -1)
    out = attn.softmax(dim=-1) @ v
    return module.proj(out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_has_timm_names(method):
    module = _module(method, **ANY[method])
    keys = set(module.state_dict())
    assert TIMM_KEYS <= keys
    assert module.state_dict()["qkv.weight"].shape == (3 * DIM, DIM)
    if method in ("dense", "grat", "pisa", "llsa", "clear"):
        assert keys == TIMM_KEYS


@pytest.mark.parametrize(
    "qk_norm, norm_keys", [(True, {"weight", "bias"}), ("layer_norm", {"weight", "bias"}), ("rms_norm", {"weight"})]
)
def test_qk_norm_keys(qk_norm, norm_keys):
    keys = set(_module(qk_norm=qk_norm).state_dict())
    assert keys == TIMM_KEYS | {f"{n}.{p}" for n in ("q_norm", "k_norm") for p in norm_keys}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_dense_matches_timm_computation(qk_norm):
    module = _module(qk_norm=qk_norm)
    x = _x(2, 20)
    torch.testing.assert_close(module(x), _timm_attention(module, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(EXACT))
@pytest.mark.parametrize("grid", [None, TokenGrid(5, 7), TokenGrid(4, 6, text_tokens=3, text_position="last")])
def test_exact_settings_equal_dense(method, grid):
    dense = _module()
    module = _module(method, **EXACT[method])
    module.load_state_dict(dense.state_dict())  # a dense checkpoint loads unchanged
    x = _x(2, 64 if grid is None else grid.num_tokens)
    torch.testing.assert_close(module(x, grid=grid), dense(x, grid=grid), atol=2e-6, rtol=1e-5)


def _with_reference_attention(module: Attention, x: torch.Tensor, attend) -> list[torch.Tensor]:
    """``module(x)`` in float32 and float64 (the reference pair of :func:`assert_close`) with its attention replaced
    by ``attend(twin, q, k, v)``, a reference on the copy's own ``(B, H, N, Dh)`` projections."""
    outs = []
    for dtype in (torch.float32, torch.float64):
        twin = copy.deepcopy(module).to(dtype)
        B, N, C = x.shape
        q, k, v = twin.qkv(x.to(dtype)).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        outs.append(twin.proj(attend(twin, q, k, v).transpose(1, 2).reshape(B, N, C)).detach())
    return outs


@pytest.mark.parametrize("method", sorted(SPARSE))
def test_sparse_settings_equal_the_reference_and_differ_from_dense(method):
    """The module's sparse output is the method's reference on its own q, k, v (the grid reaching PISA's tiles and
    LLSA's Z-order too), in float32 and float64, and differs from dense."""
    dense = _module()
    module = _module(method, **SPARSE[method])
    module.load_state_dict(dense.state_dict())
    grid = TokenGrid(6, 10, text_tokens=4, text_position="last")
    x = _x(2, grid.num_tokens)
    function = getattr(reference, f"{method}_attention")

    def attend(twin, q, k, v):
        if method in ("clear", "grat"):
            return function(q, k, v, grid, **SPARSE[method])
        return function(q, k, v, grid=grid, **SPARSE[method])

    out = module(x, grid=grid).detach()
    assert_close(f"{method} module", out, *_with_reference_attention(module, x, attend))
    assert (out - dense(x, grid=grid)).abs().max() > 1e-3


@pytest.mark.parametrize("method", sorted(ANY))
def test_backward_reaches_every_parameter(method):
    module = _module(method, **ANY[method])
    x = _x(2, 64).requires_grad_(True)
    module(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if method == "dydila":  # routers train through the straight-through estimator
        assert module.q_aux.router.weight.grad.abs().sum() > 0
        assert module.lambdas["q"].bank.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["clear", "grat"])
def test_grid_inferred_when_square(method):
    module = _module(method, **SPARSE[method])
    x = _x(1, 49)
    torch.testing.assert_close(module(x), module(x, grid=TokenGrid(7, 7)))


@pytest.mark.parametrize("method, options", [("clear", SPARSE["clear"]), ("grat", SPARSE["grat"]), ("linear", {})])
def test_grid_needed_but_not_inferable(method, options):
    module = _module(method, **options)
    with pytest.raises(ValueError, match="grid"):
        module(_x(1, 50))
    assert module(_x(1, 50), grid=TokenGrid(5, 10)).shape == (1, 50, DIM)


def test_pisa_and_llsa_run_without_grid_on_any_length():
    for method in ("pisa", "llsa"):
        assert _module(method, **SPARSE[method])(_x(1, 50)).shape == (1, 50, DIM)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="method"):
        Attention(DIM, HEADS, method="flash")
    with pytest.raises(TypeError, match="radius"):
        Attention(DIM, HEADS, method="clear")
    with pytest.raises(TypeError, match="density"):
        Attention(DIM, HEADS, method="grat", density=0.5)
    with pytest.raises(ValueError, match="num_heads"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="qk_norm"):
        Attention(DIM, HEADS, qk_norm="batch_norm")
    with pytest.raises(ValueError, match="grid"):
        _module()(_x(1, 20), grid=TokenGrid(4, 4))


def test_clear_global_tokens_match_reference_pooling():
    """down_factor=d: every image query also sees the d x d average-pooled keys/values (weights start at 1/d²)."""
    d, grid = 2, TokenGrid(4, 6, text_tokens=3, text_position="first")
    module = _module("clear", radius=1.5, down_factor=d)
    assert module.spatial_weight.shape == (1, 1, 1, d, 1, d, 1)
    x = _x(2, grid.num_tokens)
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)

    def pooled(t):
        image = t[:, :, grid.text_tokens :].reshape(B * HEADS, grid.height, grid.width, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(image, d).flatten(2).transpose(1, 2).reshape(B, HEADS, -1, C // HEADS)

    out = reference.clear_attention(q, k, v, grid, radius=1.5, global_kv=(pooled(k), pooled(v)))
    expected = module.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(module(x, grid=grid), expected, atol=2e-6, rtol=1e-5)


def _windows_written_out(t: torch.Tensor, grid: TokenGrid, weight: torch.Tensor) -> torch.Tensor:
    """CLEAR's global tokens of ``t (B, H, N, D)`` one window at a time: d x d windows from the top-left corner of
    each frame, a border window summing ``weight[a, b] * token`` over only the cells inside the grid."""
    d = weight.shape[0]
    image = t[:, :, grid.image_range.start : grid.image_range.stop]
    image = image.reshape(*t.shape[:2], grid.frames, grid.height, grid.width, t.shape[-1])
    windows = []
    for f in range(grid.frames):
        for y0 in range(0, grid.height, d):
            for x0 in range(0, grid.width, d):
                cells = [weight[y - y0, x - x0] * image[:, :, f, y, x]
                         for y in range(y0, min(y0 + d, grid.height)) for x in range(x0, min(x0 + d, grid.width))]
                windows.append(torch.stack(cells).sum(0))
    return torch.stack(windows, dim=2)


@pytest.mark.parametrize("d, grid", [(2, TokenGrid(5, 7, text_tokens=3)),
                                     (3, TokenGrid(4, 5, frames=2, text_tokens=2, text_position="last"))])
def test_clear_global_tokens_on_sides_the_window_does_not_divide(d, grid):
    """Border windows hold only the cells inside the grid and windows start at each frame's top-left corner (the
    zero padding goes after the last row and column): the module against :func:`_windows_written_out` with random
    cell weights, through the reference."""
    module = _module("clear", radius=1.5, down_factor=d)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        module.spatial_weight.copy_(0.5 + torch.rand(module.spatial_weight.shape, generator=gen))
    x = _x(2, grid.num_tokens, seed=6)

    def attend(twin, q, k, v):
        weight = twin.spatial_weight.reshape(d, d)
        global_kv = (_windows_written_out(k, grid, weight), _windows_written_out(v, grid, weight))
        return reference.clear_attention(q, k, v, grid, radius=1.5, global_kv=global_kv)

    out = module(x, grid=grid).detach()
    assert_close("clear global tokens, ragged windows", out, *_with_reference_attention(module, x, attend))


def test_linear_is_relu_linear_attention():
    module = _module("linear", dwconv_kernel=0)
    assert module.dwconv is None
    x = _x(2, 16)
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    q, k = F.relu(q), F.relu(k)
    out = (q @ (k.transpose(-1, -2) @ v)) / (q @ k.sum(dim=2, keepdim=True).transpose(-1, -2) + N * 1e-6)
    expected = module.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(module(x), expected, atol=2e-6, rtol=1e-5)
    with_conv = _module("linear")
    assert tuple(with_conv.dwconv.weight.shape) == (DIM, 1, 5, 5)


@pytest.mark.parametrize("method, cls", [("linear", "LiTAttention"), ("dydila", "DyDiLA")])
def test_linear_methods_share_weights_with_the_nn_classes(method, cls):
    """Attention(method="linear"/"dydila") has the parameters of difattn.nn.LiTAttention / DyDiLA and computes
    the same function, so checkpoints move between them."""
    torch.manual_seed(0)
    other = getattr(difattn.nn, cls)(DIM, HEADS)
    module = _module(method)
    assert set(module.state_dict()) == set(other.state_dict())
    module.load_state_dict(other.state_dict())
    grid = TokenGrid(4, 5, text_tokens=2)
    x = _x(2, grid.num_tokens)
    torch.testing.assert_close(module(x, grid=grid), other(x, grid=grid), atol=1e-6, rtol=1e-5)


def test_rope_rotates_pairs_and_leaves_text_alone():
    grid = TokenGrid(3, 4, text_tokens=2, text_position="last")
    cos, sin = rope_2d(grid, 8)
    assert cos.shape == (grid.num_tokens, 8)
    torch.testing.assert_close(cos[grid.text_range.start :], torch.ones(2, 8))
    x = torch.randn(1, 1, grid.num_tokens, 8)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # Relative positions: <R(p) a, R(p') b> depends on p - p' only.
    a, b = torch.randn(8), torch.randn(8)
    one = TokenGrid(5, 5)
    c, s = rope_2d(one, 8)

    def score(i, j):
        qa = apply_rope(a.expand(1, 1, 25, 8), c, s)[0, 0, i]
        kb = apply_rope(b.expand(1, 1, 25, 8), c, s)[0, 0, j]
        return float(qa @ kb)

    assert math.isclose(score(0, 6), score(12, 18), rel_tol=1e-5)  # both offsets (+1, +1)


def test_rope_identity_equals_no_rope():
    module = _module(qk_norm="rms_norm")
    x = _x(1, 16)
    ones, zeros = torch.ones(16, DIM // HEADS), torch.zeros(16, DIM // HEADS)
    torch.testing.assert_close(module(x, rope=(ones, zeros)), module(x))


def test_public_functions_back_the_module():
    """The sparse path goes through difattn's public functions (the same backend table)."""
    module = _module("grat", group=(2, 2))
    grid = TokenGrid(4, 4)
    x = _x(1, 16)
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    out = difattn.grat_attention(q, k, v, grid, group=(2, 2))
    torch.testing.assert_close(module(x, grid=grid), module.proj(out.transpose(1, 2).reshape(B, N, C)))
