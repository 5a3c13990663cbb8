"""difattn.nn.DyDiLA and difattn.nn.LiTAttention: shapes on grids with text and frames, the straight-through
routing (hard choices forward, gradients to routers and chosen bank entries), the depthwise conv on image tokens
only, agreement of the Rust path with the torch reference, and a tiny model that trains."""

import pytest
import torch

import difattn
from difattn import TokenGrid, reference
from difattn.nn import DyDiLA, LiTAttention, straight_through
from difattn.testing import assert_close

DIM, HEADS = 32, 2
GRIDS = [
    TokenGrid(4, 5),
    TokenGrid(3, 4, text_tokens=5),
    TokenGrid(3, 3, frames=2, text_tokens=2, text_position="last"),
]


def _x(grid, batch=2, seed=0):
    return torch.randn(batch, grid.num_tokens, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cls", [DyDiLA, LiTAttention])
def test_shapes_on_grids_with_text_and_frames(cls, grid):
    torch.manual_seed(0)
    out = cls(DIM, HEADS)(_x(grid), grid)
    assert out.shape == (2, grid.num_tokens, DIM) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [DyDiLA, LiTAttention])
def test_square_grid_is_inferred_and_other_lengths_need_a_grid(cls):
    torch.manual_seed(0)
    module = cls(DIM, HEADS)
    x = _x(TokenGrid(4, 4))
    torch.testing.assert_close(module(x), module(x, TokenGrid(4, 4)))
    with pytest.raises(ValueError, match="perfect square"):
        module(_x(TokenGrid(3, 5)))
    cls(DIM, HEADS, dwconv_kernel=0)(_x(TokenGrid(3, 5)))  # no conv, no grid needed


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_heads"):
        DyDiLA(30, 4)
    with pytest.raises(ValueError, match="dwconv_kernel"):
        LiTAttention(DIM, HEADS, dwconv_kernel=4)
    with pytest.raises(ValueError, match="num_projectors"):
        DyDiLA(DIM, HEADS, num_projectors=0)


def test_lit_attention_is_relu_linear_attention_plus_conv_with_timm_names():
    torch.manual_seed(1)
    module = LiTAttention(DIM, HEADS)
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= set(module.state_dict())
    grid = TokenGrid(3, 4, text_tokens=2)
    x = _x(grid, seed=1)
    B, N, _ = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    core = reference.linear_attention(q.relu(), k.relu(), v).transpose(1, 2).reshape(B, N, DIM)
    v_tokens = v.transpose(1, 2).reshape(B, N, DIM)
    image = v_tokens[:, 2:].reshape(B, 3, 4, DIM).permute(0, 3, 1, 2)
    conv = module.dwconv(image).permute(0, 2, 3, 1).reshape(B, 12, DIM)
    expected = module.proj(core + torch.cat([torch.zeros(B, 2, DIM), conv], 1))
    torch.testing.assert_close(module(x, grid), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [DyDiLA, LiTAttention])
def test_text_tokens_get_no_conv(cls):
    torch.manual_seed(2)
    grid = TokenGrid(3, 4, text_tokens=3, text_position="last")
    module = cls(DIM, HEADS)
    x = _x(grid, seed=2)
    with_conv = module(x, grid)
    with torch.no_grad():
        module.dwconv.weight.zero_()
        module.dwconv.bias.zero_()
    without = module(x, grid)
    text = slice(grid.text_range.start, grid.text_range.stop)
    torch.testing.assert_close(with_conv[:, text], without[:, text])
    assert not torch.allclose(with_conv[:, :12], without[:, :12])


def test_straight_through_is_hard_forward_soft_backward():
    logits = torch.randn(5, 4, requires_grad=True)
    weights = straight_through(logits)
    assert torch.equal(weights.detach(), torch.nn.functional.one_hot(logits.argmax(-1), 4).float())
    (weights * torch.arange(4.0)).sum().backward()
    soft = logits.detach().softmax(-1)
    expected = soft * (torch.arange(4.0) - (soft * torch.arange(4.0)).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected)


def test_routing_picks_bank_values_and_every_router_and_bank_gets_gradients():
    torch.manual_seed(3)
    module = DyDiLA(DIM, HEADS, num_projectors=3, num_kernels=5, num_lambdas=4)
    grid = TokenGrid(4, 4, text_tokens=3)
    x = _x(grid, seed=3)
    captured = {}
    original = difattn.functional.dydila_attention

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return original(*args, **kwargs)

    difattn.nn.functional.dydila_attention = spy
    try:
        out = module(x, grid)
    finally:
        difattn.nn.functional.dydila_attention = original
    for name in ("q", "k", "q_aux", "k_aux"):  # forward values are bank entries (hard choices)
        bank = module.kernels[name].values().detach()
        gamma = captured[f"gamma_{name}"].detach()
        assert gamma.shape == (2, HEADS, grid.num_tokens)
        assert torch.isin(gamma, bank).all() and (gamma >= 1).all()
    for name in ("q", "k"):
        assert torch.isin(captured[f"lambda_{name}"].detach(), module.lambdas[name].bank.detach()).all()

    out.pow(2).mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # A bank entry gets gradient only when some token chose it (the estimator's forward is the hard choice).
    bank = module.kernels["q"]
    chosen = torch.isin(bank.values().detach(), captured["gamma_q"].detach())
    assert (bank.bank.grad[~chosen] == 0).all() and (bank.bank.grad[chosen] != 0).all()


def test_rust_path_matches_the_torch_reference_in_outputs_and_parameter_gradients():
    torch.manual_seed(4)
    grid = TokenGrid(5, 4, text_tokens=3)
    fast = DyDiLA(DIM, HEADS)
    slow = DyDiLA(DIM, HEADS, backend="torch")
    slow.load_state_dict(fast.state_dict())
    x = _x(grid, seed=4)
    outs = []
    for module in (fast, slow):
        out = module(x, grid)
        out.pow(2).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-3, atol=1e-5, msg=name)


def _train(cls, backend, steps=12):
    """Losses of Adam steps fitting a fixed batch with attention (on ``backend``) and a linear head."""
    torch.manual_seed(5)
    grid = TokenGrid(4, 4, text_tokens=2)
    model = torch.nn.ModuleDict({"attention": cls(DIM, HEADS, backend=backend), "head": torch.nn.Linear(DIM, DIM)})
    x = _x(grid, batch=2, seed=5)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (model["head"](model["attention"](x, grid)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("cls", [DyDiLA, LiTAttention])
def test_a_tiny_model_trains_as_on_the_reference(cls):
    """The loss falls over 12 Adam steps, and step by step equals the loss of the same model trained with the torch
    reference as its attention core (every step's forward, gradients and update follow the reference's)."""
    fast, ref = _train(cls, "auto"), _train(cls, "torch")
    assert fast[-1] < 0.8 * fast[0], fast[::5]
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=0)


def _twin_power_map(z, gamma, eps):
    """φ_γ(z) = ‖r‖ · r^γ / ‖r^γ‖ with r = relu(z) + eps, norms over the head dim (the paper's formula as written)."""
    r = z.relu() + eps
    p = r ** gamma.unsqueeze(-1)
    return r.norm(dim=-1, keepdim=True) * p / p.norm(dim=-1, keepdim=True)


def _dydila_twin(module, x, grid, eps=1e-6):
    """DyDiLA's forward from the module's weights, step by step as the paper states it, in x's dtype: an independent
    twin (no helper of difattn.nn or difattn.functional, the attention core written out)."""
    weights = {name: p.detach().to(x.dtype) for name, p in module.named_parameters()}
    B, N, C = x.shape
    H, Dh = module.num_heads, C // module.num_heads

    def heads(t):  # (B, N, C) -> (B, H, N, Dh)
        return t.view(B, N, H, Dh).transpose(1, 2)

    def linear(t, name):
        return t @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    q, k, v = linear(x, "qkv").view(B, N, 3, C).unbind(2)
    streams = {"q": heads(q), "k": heads(k)}
    for name in ("q_aux", "k_aux"):  # one full-width projector per token, the router's argmax
        choice = linear(x, f"{name}.router").argmax(dim=-1)  # (B, N)
        bank = linear(x, f"{name}.bank").view(B, N, -1, C)  # (B, N, P, C)
        streams[name] = heads(bank.gather(2, choice[..., None, None].expand(B, N, 1, C)).squeeze(2))
    gamma, phi = {}, {}
    for name, z in streams.items():  # γ per token and head from the bank clamped to >= 1
        logits = z @ weights[f"kernels.{name}.router.weight"].T + weights[f"kernels.{name}.router.bias"]
        gamma[name] = weights[f"kernels.{name}.bank"].clamp_min(1.0)[logits.argmax(dim=-1)]
        phi[name] = _twin_power_map(z, gamma[name], eps)
    hat = {}
    for side in ("q", "k"):  # λ routed on [φ(z), φ(z_aux)]; the differential φ(z) − λ φ(z_aux)
        features = torch.cat([phi[side], phi[f"{side}_aux"]], dim=-1)
        logits = features @ weights[f"lambdas.{side}.router.weight"].T + weights[f"lambdas.{side}.router.bias"]
        lam = weights[f"lambdas.{side}.bank"][logits.argmax(dim=-1)]
        hat[side] = phi[side] - lam.unsqueeze(-1) * phi[f"{side}_aux"]
    vh = heads(v)
    state = hat["k"].transpose(-1, -2) @ vh / N  # (B, H, Dh, Dh)
    out = (hat["q"] @ state).transpose(1, 2).reshape(B, N, C)
    image = slice(grid.image_range.start, grid.image_range.stop)
    frames = v[:, image].reshape(B * grid.frames, grid.height, grid.width, C).permute(0, 3, 1, 2)
    conv = torch.nn.functional.conv2d(frames, weights["dwconv.weight"], weights["dwconv.bias"],
                                      padding=module.dwconv.padding, groups=C)
    out[:, image] += conv.permute(0, 2, 3, 1).reshape(B, grid.image_tokens, C)
    return linear(out, "proj")


@pytest.mark.parametrize("grid", [TokenGrid(3, 4, text_tokens=3),
                                  TokenGrid(3, 3, frames=2, text_tokens=2, text_position="last")])
def test_forward_equals_the_paper_written_out(grid):
    """DyDiLA's forward against :func:`_dydila_twin` with random banks (distinct per stream and side), so a
    swapped λ_q/λ_k, γ of one stream used for another, or a router fed the wrong features changes the output by far
    more than rounding. The module runs in float32 on the default (Rust) core; the twin in float32 and float64."""
    torch.manual_seed(7)
    module = DyDiLA(DIM, HEADS, num_projectors=3, num_kernels=5, num_lambdas=4)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name in ("q", "k", "q_aux", "k_aux"):
            module.kernels[name].bank.copy_(0.5 + 4.5 * torch.rand(5, generator=gen))  # some below the clamp at 1
        for name in ("q", "k"):
            module.lambdas[name].bank.copy_(torch.rand(4, generator=gen))
    x = _x(grid, seed=9)
    out = module(x, grid)
    low = _dydila_twin(module, x, grid)
    high = _dydila_twin(module, x.double(), grid)
    assert_close("DyDiLA vs its written-out twin", out, low, high)
