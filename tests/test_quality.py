"""Quality next to speed: the structured inputs, the quality metrics and the selections they read."""

import math

import pytest
import torch
import torch.nn.functional as F

from difattn import TokenGrid, functional, reference
from difattn.bench import quality
from difattn.bench.capture import SDPACapture
from difattn.bench.inputs import head_models, structured_qkv
from difattn.reference.ordering import morton_code
from difattn.testing import random_qkv

GRID = TokenGrid(16, 16)


@pytest.mark.parametrize("grid, head_dim", [(TokenGrid(13, 9), 72), (TokenGrid(5, 7, frames=3, text_tokens=4, text_position="last"), 9),
                                            (TokenGrid(6, 6, text_tokens=5), 64)])
def test_structured_inputs_are_deterministic(grid, head_dim):
    """Same arguments, bit-identical tensors (odd grids, videos, text first or last, odd head dims); another seed
    gives other tensors."""
    q, k, v = structured_qkv(grid, batch=2, heads=3, head_dim=head_dim, seed=3)
    again = structured_qkv(grid, batch=2, heads=3, head_dim=head_dim, seed=3)
    other = structured_qkv(grid, batch=2, heads=3, head_dim=head_dim, seed=4)
    for x, y, z in zip((q, k, v), again, other):
        assert x.shape == (2, 3, grid.num_tokens, head_dim) and x.dtype == torch.float32
        assert torch.equal(x, y) and not torch.equal(x, z)
        assert torch.isfinite(x).all()


def test_structured_inputs_reject_bad_arguments():
    with pytest.raises(ValueError, match="heads"):
        structured_qkv(GRID, heads=0)
    with pytest.raises(ValueError, match="kinds"):
        structured_qkv(GRID, kinds=("local", "diagonal"))
    with pytest.raises(ValueError, match="sinks"):
        structured_qkv(TokenGrid(2, 2), sinks=5)
    with pytest.raises(TypeError, match="grid"):
        structured_qkv((16, 16))


def _clear_recall(q, k, grid, radius):
    return quality.recalls(q, k, {"r": quality.pair_mask(reference.clear_mask(grid, radius))})["r"][0]


def test_structured_heads_have_their_patterns():
    """Local heads keep most of their mass near the query; global heads spread it over far-away segments; random
    q/k/v attend almost uniformly (the i.i.d. inputs this module replaces)."""
    q, k, _ = structured_qkv(GRID, heads=3, head_dim=32, sinks=0)
    kinds = [m.kind for m in head_models(GRID, 3)]
    assert kinds == ["local", "axial", "global"]
    local = _clear_recall(q[:, :1], k[:, :1], GRID, 4.0)
    segment = _clear_recall(q[:, 2:], k[:, 2:], GRID, 4.0)
    rq, rk, _ = random_qkv(1, 1, GRID.num_tokens, 32)
    flat = _clear_recall(rq, rk, GRID, 4.0)
    assert local > 0.6 and segment < local - 0.2 and flat < 0.2


def test_sinks_and_text_take_their_share():
    """The sink draws mass from every image query in every head (the same token in all heads), and image queries put
    a share of their mass on the text."""
    grid = TokenGrid(12, 12, text_tokens=8)
    q, k, _ = structured_qkv(grid, heads=3, head_dim=32, sinks=1, seed=1)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32**0.5, -1)[0]  # (H, N, N)
    image = ~grid.is_text()
    per_key = probs[:, image][:, :, image].mean(1)  # (H, image keys): mean over image queries
    sink = k[0][:, image].norm(dim=-1).argmax(-1)  # the high-norm key of each head
    assert bool((sink == sink[0]).all())
    assert bool((per_key[:, sink[0]] > 2 / grid.image_tokens).all())
    text_share = probs[:, image][:, :, ~image].sum(-1).mean()
    assert 0.01 < float(text_share) < 0.5


def test_recall_is_one_where_the_method_is_exact():
    """CLEAR with a radius covering the grid, PISA at density 1 and LLSA with top-k = all blocks compute every pair:
    recall 1; CLEAR and PISA then equal dense attention."""
    grid = TokenGrid(9, 11, text_tokens=3)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, dtype=torch.float64)
    dense = quality.dense_float64(q, k, v)
    n = grid.num_tokens
    clear_out = functional.clear_attention(q, k, v, grid, radius=20.0, backend="torch")
    pisa_out, blocks = functional.pisa_attention(q, k, v, grid=grid, density=1.0, block_size=16, return_blocks=True,
                                                 backend="torch")
    _, indices = functional.llsa_attention(q, k, v, grid=grid, block_size=4, topk=-(-n // 4), levels=1,
                                           return_indices=True, backend="torch")
    got = quality.recalls(q, k, {
        "clear": quality.pair_mask(reference.clear_mask(grid, 20.0)),
        "pisa": quality.pisa_kept(blocks, grid, n, 16),
        "llsa": quality.llsa_kept(indices, grid, n, 4),
    })
    for name, (recall, worst) in got.items():
        assert recall == pytest.approx(1.0, abs=1e-12) and worst == pytest.approx(1.0, abs=1e-12), name
    assert quality.output_errors(clear_out, dense)["rel_err_dense"] < 1e-12
    assert quality.output_errors(pisa_out, dense)["worst_head_rel_err"] < 1e-12
    assert quality.pisa_taylor_mass(q, k, blocks, grid, 16) == 0.0


def test_recall_grows_with_clear_radius_and_pisa_density():
    q, k, v = structured_qkv(GRID, heads=3, head_dim=32)
    clear = [_clear_recall(q, k, GRID, r) for r in (1.0, 2.0, 4.0, 8.0)]
    assert all(a < b for a, b in zip(clear, clear[1:])), clear
    pisa = []
    for density in (1 / 16, 1 / 8, 1 / 4, 1 / 2):
        _, blocks = functional.pisa_attention(q, k, v, grid=GRID, density=density, block_size=16, return_blocks=True)
        pisa.append(quality.recalls(q, k, {"p": quality.pisa_kept(blocks, GRID, GRID.num_tokens, 16)})["p"][0])
    assert all(a < b for a, b in zip(pisa, pisa[1:])), pisa


def test_pisa_hybrid_beats_zeroth_order_on_structured_inputs():
    """The first-order term with the mean moment H̄ lowers the error: keys and values of a block vary together (one
    latent). Without sinks: a sink PISA's mean-pooled routing misses costs both orders alike and hides the gain."""
    q, k, v = structured_qkv(GRID, heads=3, head_dim=32, sinks=0)
    dense = quality.dense_float64(q, k, v)
    err = {order: quality.output_errors(functional.pisa_attention(q, k, v, grid=GRID, density=0.125, block_size=16,
                                                                  order=order), dense)["rel_err_dense"]
           for order in ("zeroth", "hybrid")}
    assert err["hybrid"] < err["zeroth"], err


def _pisa_block_twin(grid: TokenGrid, block_size: int) -> torch.Tensor:
    """Block of each raster token from PISA's documented layout, computed from coordinates (no permutation)."""
    th = 2 ** (int(math.log2(block_size)) // 2)
    tw = block_size // th
    text_blocks = -(-grid.text_tokens // block_size)
    tiles_y, tiles_x = -(-grid.height // th), -(-grid.width // tw)
    image_blocks = grid.frames * tiles_y * tiles_x
    out = []
    for i in range(grid.num_tokens):
        if i in grid.text_range:
            j = (i - grid.text_range.start) // block_size
            out.append(j if grid.text_position == "first" else image_blocks + j)
        else:
            p = i - grid.image_range.start
            t, y, x = p // (grid.height * grid.width), p // grid.width % grid.height, p % grid.width
            tile = (t * tiles_y + y // th) * tiles_x + x // tw
            out.append(tile + (text_blocks if grid.text_position == "first" else 0))
    return torch.tensor(out)


def _llsa_block_twin(grid: TokenGrid, block_size: int) -> torch.Tensor:
    """Block of each raster token: image tokens sorted per frame by Morton code, text in place, runs of b."""
    position = list(range(grid.num_tokens))
    image = list(grid.image_range)
    key = lambda i: ((i - image[0]) // (grid.height * grid.width),  # noqa: E731
                     int(morton_code(torch.tensor((i - image[0]) // grid.width % grid.height), torch.tensor((i - image[0]) % grid.width))))
    for slot, token in zip(image, sorted(image, key=key)):
        position[token] = slot
    return torch.tensor(position) // block_size


@pytest.mark.parametrize("grid", [TokenGrid(7, 10, text_tokens=5, text_position="last"),
                                  TokenGrid(6, 5, frames=2, text_tokens=9)])
def test_selections_map_to_raster_pairs(grid):
    """The kept pairs read from PISA's and LLSA's selections equal a slow twin built from each op's documented block
    numbering (text first or last, odd sides, frames)."""
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=2)
    n = grid.num_tokens
    _, blocks = functional.pisa_attention(q, k, v, grid=grid, density=0.3, block_size=16, return_blocks=True)
    _, indices = functional.llsa_attention(q, k, v, grid=grid, block_size=4, topk=3, levels=1, return_indices=True)
    for kept, block, chosen in ((quality.pisa_kept(blocks, grid, n, 16), _pisa_block_twin(grid, 16), blocks),
                                (quality.llsa_kept(indices, grid, n, 4), _llsa_block_twin(grid, 4), indices[0])):
        twin = torch.zeros(*chosen.shape[:2], n, n, dtype=torch.bool)
        for b in range(chosen.shape[0]):
            for h in range(chosen.shape[1]):
                for i in range(n):
                    twin[b, h, i] = torch.isin(block, chosen[b, h, block[i]])
        assert torch.equal(kept(0, n), twin)


def test_pisa_taylor_mass_is_exact_for_blockwise_constant_keys():
    """With keys constant inside each block, ``e^{s q·k̄_j}`` is every key's weight: PISA's own Taylor share equals the
    dense mass on its Taylor blocks; with varied keys it falls short (Jensen)."""
    grid = TokenGrid(8, 8)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, dtype=torch.float64)
    block = _pisa_block_twin(grid, 16)
    means = torch.zeros(1, 2, int(block.max()) + 1, 16, dtype=torch.float64).index_add_(2, block, k)
    flat_k = means[:, :, block] / torch.bincount(block)[block, None]
    for keys, exact in ((flat_k, True), (k, False)):
        _, blocks = functional.pisa_attention(q, keys, v, grid=grid, density=0.25, block_size=16, return_blocks=True)
        recall = quality.recalls(q, keys, {"p": quality.pisa_kept(blocks, grid, grid.num_tokens, 16)})["p"][0]
        est = quality.pisa_taylor_mass(q, keys, blocks, grid, 16)
        if exact:
            assert est == pytest.approx(1 - recall, abs=1e-12)
        else:
            assert est < 1 - recall - 0.01


def test_psnr_and_ssim():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 12, generator=gen) * 2 - 1
    assert quality.psnr(x, x) == math.inf and quality.ssim(x, x) == pytest.approx(1.0)
    shifted = x + 0.01
    peak = float(x.max() - x.min())
    assert quality.psnr(shifted, x) == pytest.approx(10 * math.log10(peak**2 / 1e-4), rel=1e-4)
    noisy = x + 0.5 * torch.randn(x.shape, generator=gen)
    assert quality.ssim(noisy, x) < 0.8 < quality.ssim(shifted, x)
    video = torch.rand(1, 2, 3, 9, 9, generator=gen)
    assert quality.ssim(video, video) == pytest.approx(1.0)


def test_capture_records_self_attention_calls_only():
    """SDPACapture stacks every plain self-attention call along the heads and skips masked or cross-attention
    calls, while every call still returns its usual result."""
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    cross_k = torch.randn(2, 3, 4, 8)
    with SDPACapture() as cap:
        first = F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, cross_k, cross_k)
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(10, 10, dtype=torch.bool))
        F.scaled_dot_product_attention(query=2 * q, key=k, value=v)
    assert torch.equal(first, F.scaled_dot_product_attention(q, k, v))
    assert cap.skipped == 2
    sq, sk, sv = cap.stacked()
    assert sq.shape == (2, 6, 10, 8)
    assert torch.equal(sq[:, 3:], 2 * q) and torch.equal(sk[:, :3], k) and torch.equal(sv[:, 3:], v)


def test_bench_json_carries_quality_records(tmp_path, monkeypatch):
    """The plain run adds its cases' quality on structured inputs, with the speed of the matching forward record;
    ``--quality`` sweeps the knobs (captured and end-to-end models skipped here: no weights, no diffusers)."""
    import json

    from difattn.bench import pipelines
    from difattn.bench.quality_suite import QUALITY_FIELDS
    from difattn.cli import main

    keys = {"method", "backend", "options", "inputs", "source", "B", "H", "N", "D", "dtype", "grid", "ms", "dense_ms",
            "speedup", "work_fraction", *QUALITY_FIELDS, "steps", "dense_steps", "dense_layers"}
    path = tmp_path / "plain.json"
    assert main(["bench", "--device", "cpu", "--grid", "8x8+3", "--heads", "2", "--head-dim", "16", "--quick",
                 "--methods", "clear", "pisa", "linear", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    quality_records = payload["quality"]
    assert {r["method"] for r in quality_records} == {"clear", "pisa", "linear"}
    for r in quality_records:
        assert set(r) == keys and r["inputs"] == "structured"
        speed = next(s for s in payload["records"] if s["method"] == r["method"] and s["pass"] == "fwd")
        assert r["speedup"] == speed["speedup"] and r["rel_err_dense"] != speed["rel_err_dense"]
        assert (r["recall"] is None) == (r["method"] == "linear")

    path = tmp_path / "quality.json"
    monkeypatch.setattr(pipelines, "available", lambda: False)
    assert main(["bench", "--device", "cpu", "--grid", "16x16", "--heads", "2", "--head-dim", "16", "--quick",
                 "--quality", "--methods", "clear", "--digits-weights", str(tmp_path / "none.pt"), "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    structured = [r for r in payload["quality"] if r["inputs"] == "structured"]
    noise = [r for r in payload["quality"] if r["inputs"] == "random"]
    radii = [r["options"]["radius"] for r in structured]
    assert payload["records"] == [] and radii == sorted(radii) and len(radii) >= 4
    assert [r["options"] for r in noise] == [r["options"] for r in structured]
    recalls = [r["recall"] for r in structured]
    assert recalls == sorted(recalls) and all(r["speedup"] > 0 for r in structured)
    assert all(n["recall"] < s["recall"] for n, s in zip(noise, structured) if s["recall"] < 1)


def test_digits_model_capture_and_sample(tmp_path):
    """Weights saved as the example saves them load into any method; capture stacks every layer's heads; a sample
    with every step dense equals the dense sample."""
    from difattn.bench import digits
    from difattn.models import PixelDiT

    torch.manual_seed(0)
    config = {"input_size": 8, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
    model = PixelDiT(**config, attention="dense")
    for p in model.parameters():  # adaLN-Zero starts as the identity: make every layer matter
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "digits.pt"
    torch.save({"config": config, "state_dict": {n: t.half() for n, t in model.state_dict().items()}}, path)
    dense, clear = digits.load(path), digits.load(path, "clear", {"radius": 2.0})
    grid, q, k, v = digits.capture(dense)
    assert grid == TokenGrid(8, 8) and q.shape == (4, 4, 64, 16) and k.shape == v.shape == q.shape
    labels, noise = torch.arange(3), torch.randn(3, 1, 8, 8)
    want = digits.sample(lambda i: dense, labels, noise, 3)
    assert torch.equal(digits.sample(lambda i: dense if i < 3 else clear, labels, noise, 3), want)
    assert quality.psnr(digits.sample(lambda i: clear, labels, noise, 3), want) < 80


def test_pipeline_training_is_deterministic():
    """The few training steps the tiny models take are seeded: two runs give the same weights, which moved."""
    pytest.importorskip("diffusers")
    from difattn.bench import pipelines

    family = pipelines.FAMILIES["wan"]()
    start = family.build().state_dict()
    a, b = (pipelines.train(family, family.build(), steps=2).state_dict() for _ in range(2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], start[n]) for n in a)


def test_pipeline_dense_steps_cover_the_run():
    """End to end on the tiny Wan: with every step dense the latent equals the dense run's; with CLEAR it does not."""
    pytest.importorskip("diffusers")
    import difattn.diffusers as dd
    from difattn.bench import pipelines

    family = pipelines.FAMILIES["wan"]()
    model = family.build()
    want = pipelines.run(family, model, 2)
    for dense_steps, same in ((2, True), (0, False)):
        dd.apply(model, "clear", radius=2.0, dense_steps=dense_steps)
        try:
            got = pipelines.run(family, model, 2)
        finally:
            dd.remove(model)
        assert torch.equal(got, want) == same


def test_pareto_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from difattn.bench.quality_suite import pareto_plot

    records = [{"method": m, "inputs": "structured", "speedup": s, "rel_err_dense": e, "recall": r}
               for m, s, e, r in (("clear", 10.0, 0.5, 0.4), ("clear", 3.0, 0.2, 0.8), ("linear", 50.0, 0.8, None))]
    png = tmp_path / "pareto.png"
    assert pareto_plot(records + [{**records[0], "inputs": "captured", "speedup": None}], png, "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
