"""difattn.models: the original DiT layout and size, injected attention, non-square grids, PixelDiT, LiT, DyDi-LiT,
and the digits training example."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import difattn.models as M
from difattn import TokenGrid
from difattn.models.dit import sincos_pos_embed_2d
from difattn.testing import assert_close

from compile_first import run_fresh


def _original_dit_xl2_layout() -> dict[str, tuple[int, ...]]:
    """Every tensor of facebookresearch/DiT's DiT-XL/2 state dict, written out from its models.py."""
    D, p, C, depth = 1152, 2, 4, 28
    layout = {
        "pos_embed": (1, 256, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (p * p * 2 * C, D),
        "final_layer.linear.bias": (p * p * 2 * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    block = {
        "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
        "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,),
        "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,),
        "adaLN_modulation.1.weight": (6 * D, D), "adaLN_modulation.1.bias": (6 * D,),
    }
    for i in range(depth):
        layout.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return layout


@pytest.fixture(scope="module")
def dit_xl2_meta():
    with torch.device("meta"):  # no memory, no download
        return M.DiT_XL_2()


def test_dit_xl2_parameter_count(dit_xl2_meta):
    assert sum(p.numel() for p in dit_xl2_meta.parameters()) == 675_129_632
    assert not dit_xl2_meta.pos_embed.requires_grad


def test_dit_xl2_state_dict_is_the_original_layout(dit_xl2_meta):
    layout = {name: tuple(t.shape) for name, t in dit_xl2_meta.state_dict().items()}
    assert layout == _original_dit_xl2_layout()


def _tiny_dit(**kwargs) -> M.DiT:
    torch.manual_seed(0)
    options = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    return M.DiT(**{**options, **kwargs})


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """adaLN-Zero starts every block as the identity; random weights make attention matter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _inputs(height=8, width=8, channels=4, batch=2):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, channels, height, width, generator=gen)
    return x, torch.tensor([0.3, 0.7]) * 1000, torch.tensor([1, 7])


def test_a_checkpoint_loads_unchanged_into_any_attention():
    dense = _randomize(_tiny_dit())
    x, t, y = _inputs(8, 12)
    exact = [("clear", {"radius": 100.0}), ("grat", {"group": (16, 16)}), ("pisa", {"density": 1.0, "block_size": 4})]
    for method, options in exact:
        model = _tiny_dit(attention=method, attention_options=options)
        model.load_state_dict(dense.state_dict(), strict=True)
        torch.testing.assert_close(model(x, t, y), dense(x, t, y), atol=1e-5, rtol=1e-4)
    sparse = _tiny_dit(attention="clear", attention_options={"radius": 1.5})
    sparse.load_state_dict(dense.state_dict())
    assert (sparse(x, t, y) - dense(x, t, y)).abs().max() > 1e-3


def test_sincos_embedding_equals_dit_numpy_formula():
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    size, dim = 6, 32
    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))  # w goes first
    expected = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, size, size).numpy(), expected, atol=1e-6)
    assert sincos_pos_embed_2d(dim, 3, 5).shape == (15, dim)


def test_non_square_inputs_and_grids_reach_attention():
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x, grid):
            seen.append(grid)
            return self.proj(x)

    model = _tiny_dit(attention=Recorder)
    x, t, y = _inputs(6, 10)
    assert model(x, t, y).shape == (2, 8, 6, 10)  # learn_sigma doubles the channels
    assert seen == [TokenGrid(3, 5)] * 2
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 7, 8), t[:1], y[:1])


def test_stored_and_computed_position_embeddings_agree():
    model = _randomize(_tiny_dit(input_size=(8, 12)))
    assert model.pos_embed.shape == (1, 24, 32)
    x, t, y = _inputs(8, 12)
    out = model(x, t, y)
    model.grid_size = (0, 0)  # forces the embedding to be computed for the input's grid
    torch.testing.assert_close(model(x, t, y), out)


def test_forward_with_cfg_guides_the_prediction_channels():
    model = _randomize(_tiny_dit())
    x, t, _ = _inputs()
    y = torch.tensor([3, 10])  # conditional, then the "no class" label
    out = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
    plain = model(torch.cat([x[:1], x[:1]]), t, y)
    torch.testing.assert_close(out[0], plain[0])
    torch.testing.assert_close(out[:, 4:], plain[:, 4:])


def test_registry_and_few_heads():
    assert len(M.MODELS) == 40
    with torch.device("meta"):
        names = ("LiT-S/2", "LiT-XL/2", "DyDiLiT-S/2", "DyDiLiT-XL/2", "DiT-S/2")
        heads = {name: M.MODELS[name]().num_heads for name in names}
    assert heads == {"LiT-S/2": 2, "LiT-XL/2": 4, "DyDiLiT-S/2": 2, "DyDiLiT-XL/2": 4, "DiT-S/2": 6}


def _pixel_dit(**attention_options) -> M.PixelDiT:
    torch.manual_seed(0)
    return _randomize(M.PixelDiT(
        input_size=(8, 12), in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
        attention_options={"block_size": 4, "topk": 2, **attention_options},
    )).eval()


def test_pixel_dit_is_patch_one_rope_rms():
    """PixelDiT's layout, and its forward and input gradient on the default (Rust) LLSA against the same weights
    on the torch reference, in float32 and float64."""
    model = _pixel_dit()
    assert model.patch_size == 1 and model.pos_embed is None
    assert isinstance(model.blocks[0].attn.q_norm, torch.nn.RMSNorm) and model.blocks[0].attn.method == "llsa"
    x, t, y = _inputs(8, 12, channels=3)
    runs = []
    for net, dtype in ((model, torch.float32), (_pixel_dit(backend="torch"), torch.float32),
                       (_pixel_dit(backend="torch").double(), torch.float64)):
        xi = x.detach().to(dtype).clone().requires_grad_(True)
        out = net(xi, t.to(dtype), y)
        out.square().mean().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        runs.append((out.detach(), xi.grad))
    assert runs[0][0].shape == (2, 3, 8, 12)
    for i, name in enumerate(("output", "input gradient")):
        assert_close(f"pixel DiT {name}", runs[0][i], runs[1][i], runs[2][i], gradient=i == 1)


@pytest.mark.parametrize("cls", [M.LiT, M.DyDiLiT])
def test_linear_dits_train_and_inherit_dit_weights(cls):
    torch.manual_seed(0)
    model = cls(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    x, t, y = _inputs()
    model(x, t, y).square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    dit = _randomize(_tiny_dit())
    skipped = M.inherit_dit_weights(model, dit.state_dict())
    assert torch.equal(model.blocks[1].attn.qkv.weight, dit.blocks[1].attn.qkv.weight)
    assert "blocks.0.attn.dwconv.weight" in skipped and "blocks.0.attn.qkv.weight" not in skipped


def test_digits_example_runs(tmp_path):
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    pytest.importorskip("matplotlib", reason="the digits example needs matplotlib")
    path = Path(__file__).resolve().parents[1] / "examples" / "train_pixel_dit_digits.py"
    spec = importlib.util.spec_from_file_location("train_pixel_dit_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main([
        "--method", "clear", "--steps", "3", "--batch-size", "4", "--hidden", "32", "--depth", "1",
        "--sample-steps", "1", "--size", "8", "--option", "radius=2", "--out", str(tmp_path),
    ])
    assert np.isfinite(metrics["final_loss"])
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0


def test_dit_compiles_whole():
    """A DiT with each method traces as one graph (torch.compile fullgraph, grids built inside forward), each
    compiled in a fresh process before any op of its method ran eagerly; then the compiled forward and its parameter
    gradients equal eager. Random weights everywhere (adaLN-Zero's zero final layer would make the output and every
    gradient 0) and eval mode (no random label dropout). One process for the five methods (a fresh interpreter costs
    more than the compiles)."""
    run_fresh("""
        import torch
        from difattn.models.dit import DiT

        METHODS = {"clear": {"radius": 2.0}, "grat": {"group": (2, 2)}, "pisa": {"density": 0.5, "block_size": 16},
                   "llsa": {"block_size": 4, "topk": 2}, "dydila": {}}
        gen = torch.Generator().manual_seed(1)
        x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([120.0, 870.0]), torch.tensor([1, 3])

        def model_for(method):
            torch.manual_seed(0)
            model = DiT(input_size=8, depth=1, hidden_size=64, num_heads=2, num_classes=4, attention=method,
                        attention_options=METHODS[method]).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
            return model

        def run(model, fn):
            params = [p for p in model.parameters() if p.requires_grad]
            out = fn(x, t, y)
            return out.detach(), torch.autograd.grad(out.square().sum(), params)

        models = {method: model_for(method) for method in METHODS}
        compiled = {}
        for method, model in models.items():  # every compile before the first eager call
            compiled[method] = run(model, torch.compile(model, fullgraph=True, backend="aot_eager"))
        failures = []
        for method, model in models.items():
            got, got_grads = compiled[method]
            want, want_grads = run(model, model)
            try:
                assert want.abs().amax() > 0.1, "the output is (nearly) zero: the comparison would be vacuous"
                torch.testing.assert_close(got, want)
                names = [n for n, p in model.named_parameters() if p.requires_grad]
                for name, g, w in zip(names, got_grads, want_grads):
                    assert w.abs().amax() > 0, name + ": zero gradient, nothing compared"
                    torch.testing.assert_close(g, w, msg=name)
            except AssertionError as err:
                failures.append(f"{method}: {err}")
        assert not failures, " | ".join(failures)
        """)


def test_every_model_builder_has_a_docstring():
    undocumented = [name for name, build in M.MODELS.items() if not (build.__doc__ or "").strip()]
    assert not undocumented, undocumented


def test_models_take_the_method_as_nn_attention_and_apply_do():
    """``method="clear", radius=2`` builds the same layers as ``attention="clear", attention_options={...}``, on DiT
    and PixelDiT (whose LLSA default it replaces); mixing the two spellings of the options is refused by name."""
    torch.manual_seed(0)
    one = M.DiT_S_2(input_size=8, num_classes=4, method="clear", radius=2.0)
    torch.manual_seed(0)
    other = M.DiT_S_2(input_size=8, num_classes=4, attention="clear", attention_options={"radius": 2.0})
    assert repr(one) == repr(other)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([3.0]), torch.tensor([1])
    one.eval(), other.eval()
    assert torch.equal(one(x, t, y), other(x, t, y))
    pixel = M.PixelDiT_S(input_size=8, num_classes=4, method="grat", group=(2, 2))
    assert {(b.attn.method, b.attn.options["group"]) for b in pixel.blocks} == {("grat", (2, 2))}
    with pytest.raises(ValueError, match="attention_options"):
        M.DiT_S_2(input_size=8, num_classes=4, method="clear", radius=2.0, attention_options={"radius": 3.0})
    with pytest.raises(TypeError, match="dept"):
        M.DiT_S_2(input_size=8, num_classes=4, dept=3)
