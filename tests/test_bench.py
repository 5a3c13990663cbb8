"""Benchmark support: closed-form work counts equal the masks' pair counts, and the generated reports are
up to date with the committed raw results."""

import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from difattn import TokenGrid, reference
from difattn import backends
from difattn._native import core
from difattn.bench import work
from difattn.testing.strategies import disc_radii, token_grids

ROOT = Path(__file__).resolve().parent.parent


@given(grid=token_grids(max_side=16, max_text=200, max_tokens=400), radius=disc_radii(10.0),
       rt=st.sampled_from([None, 1.0, 2.0]))
def test_clear_pairs_closed_form(grid, radius, rt):
    assert work.clear_pairs(grid, radius, rt) == int(reference.clear_mask(grid, radius, temporal_radius=rt).sum())


@given(grid=token_grids(max_side=16, max_tokens=400), group=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
       pattern=st.sampled_from(["neighbors", "criss_cross"]), reach=st.integers(0, 2))
def test_grat_pairs_closed_form(grid, group, pattern, reach):
    assert work.grat_pairs(grid, group, pattern, reach) == int(reference.grat_mask(grid, group, pattern, reach).sum())


def test_spec_check_values():
    flux = TokenGrid(64, 64, text_tokens=512)
    assert [round(4 * work.clear_pairs(flux, r) * 3072 / 1e9, 1) for r in (8, 16, 32)] == [63.5, 86.6, 154.1]
    big = TokenGrid(512, 512, text_tokens=512)
    image_queries = big.image_tokens * big.num_tokens

    def sparsity(pattern):
        pairs = work.grat_pairs(big, (16, 16), pattern, 1) - big.text_tokens * big.num_tokens  # image queries only
        return 100 * (1 - pairs / image_queries)

    assert round(sparsity("criss_cross"), 3) == 93.665
    assert round(sparsity("neighbors"), 2) == 98.96


def test_computed_pairs_cover_needed_pairs():
    grid = TokenGrid(30, 52, text_tokens=77, text_position="last")
    clear = {"radius": 8.0, "temporal_radius": 1.0}
    for backend in ("rust", "triton"):
        assert backends.computed_pairs("clear", backend, grid, 64, clear) >= work.clear_pairs(grid, 8.0)
        grat = {"group": (1, 8, 8), "pattern": "neighbors", "reach": 1}
        assert backends.computed_pairs("grat", backend, grid, 64, grat) >= work.grat_pairs(grid, (8, 8), "neighbors", 1)


def test_clear_cpu_computed_pairs():
    """CLEAR's CPU kernels compute every lane of each 16-query tile over the union of its discs: never fewer pairs
    than needed, exactly the needed ones when a single full tile sees every key, and the union's excess at r=8."""
    pairs = lambda grid, r: core().clear_computed_pairs(grid.core_args(), 0, r, 1.0)
    grid = TokenGrid(30, 52, text_tokens=77, text_position="last")
    assert pairs(grid, 8.0) >= work.clear_pairs(grid, 8.0)
    assert pairs(TokenGrid(1, 16), 20.0) == work.clear_pairs(TokenGrid(1, 16), 20.0) == 256
    assert pairs(TokenGrid(4, 4, text_tokens=16), 1.0) == 32 * 32  # text tiles see all 32 keys; the image tile its discs' union
    ratio = pairs(TokenGrid(64, 64), 8.0) / work.clear_pairs(TokenGrid(64, 64), 8.0)
    assert 1.4 < ratio < 1.55


def test_generated_reports_are_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_report_groups_runs_into_series_and_takes_medians():
    """``<series>-run<k>`` files form one series in run order (other files stand alone); the README row of a case is
    the median over the runs of its ms, dense ms, speedup and efficiency."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)

    def run(effs):
        records = [{"method": "llsa", "backend": "rust", "pass": p, "options": {"topk": 8}, "grid": [1, 8, 8, 0, "first"],
                    "B": 1, "H": 4, "D": 64, "dtype": "float32", "ms": 10 / e, "dense_ms": 100.0, "speedup": 10 * e,
                    "efficiency": e} for p, e in zip(("fwd", "fwd+bwd"), effs)]
        return {"device": "cpu", "records": records}

    results = [(Path(name), run(effs)) for name, effs in
               [("a-run2.json", (0.5, 0.6)), ("a-run10.json", (0.9, 0.7)), ("a-run1.json", (0.7, 0.8)),
                ("b.json", (0.3, 0.3))]]
    grouped = report.series(results)
    assert [(name, [p.name for p, _ in runs]) for name, runs in grouped] == [
        ("a", ["a-run1.json", "a-run2.json", "a-run10.json"]), ("b", ["b.json"])]
    cases = report.per_case([d for _, d in grouped[0][1]])
    assert [[r["efficiency"] for r in recs] for recs in cases] == [[0.7, 0.5, 0.9], [0.8, 0.6, 0.7]]
    readme = report.readme_table(results)
    assert "medians of 3 runs" in readme and "| 14.29 | 100.00 | 7.00× | 0.70 |" in readme
    assert "| 0.30 |" in readme.split("**b**")[1]


def test_report_renders_interleaved_files_apart():
    """A `difattn bench --interleaved` file gets its own section in BENCHMARKS.md and stays out of the speed
    series and the README table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    record = {"method": "linear", "backend": "rust", "options": {"normalize": True}, "grid": [1, 8, 8, 0, "first"],
              "alone_ms": 2.0, "in_chain_ms": 2.2, "ratio": 1.1, "median_ratio": 1.2, "threads": 2,
              "cpu_threads": "openmp"}
    results = [(Path("i.json"), {"device": "cpu", "torch": "t", "commit": "c", "kind": "interleaved", "records": [record]})]
    assert "| linear | normalize=True | rust | 8x8 | 2.00 | 2.20 | 1.10× | 1.20× | 2 openmp |" in report.benchmarks_md(results)
    assert report.readme_table(results) == "No benchmark results are committed yet."


def _square_window_attention(q, k, v, side):
    """Brute-force NATTEN semantics on heads-last ``(B, h, w, H, D)``: a ``side``² window clamped inside the grid."""
    B, h, w, H, D = q.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    half = side // 2
    sy = (ys - half).clamp(0, h - side)
    sx = (xs - half).clamp(0, w - side)
    mask = ((ys[None] >= sy[:, None]) & (ys[None] < sy[:, None] + side)
            & (xs[None] >= sx[:, None]) & (xs[None] < sx[:, None] + side))
    flat = [x.reshape(B, h * w, H, -1).transpose(1, 2) for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*flat, attn_mask=mask)
    return out.transpose(1, 2).reshape(B, h, w, H, -1)


def test_natten_baseline_layout(monkeypatch):
    """The NATTEN adapter hands NATTEN heads-last grids and maps the result back (a fake NATTEN checks it)."""
    import types

    from difattn.bench import baselines, cases

    fake = types.ModuleType("natten")
    fake.functional = types.ModuleType("natten.functional")
    calls = []

    def na2d(q, k, v, kernel_size):
        calls.append(kernel_size)
        return _square_window_attention(q, k, v, kernel_size[0])

    fake.functional.na2d, fake.functional.na3d = na2d, None
    monkeypatch.setitem(sys.modules, "natten", fake)
    monkeypatch.setitem(sys.modules, "natten.functional", fake.functional)
    monkeypatch.setattr(baselines.importlib.util, "find_spec", lambda name: object())
    case = cases.Case("clear", {"radius": 3.5})
    shape = cases.Shape(TokenGrid(9, 11), heads=2, head_dim=8)
    assert baselines.natten_fns(case, shape, torch.device("cpu")) == {}  # CUDA only
    assert baselines.natten_fns(case, cases.Shape(TokenGrid(9, 11, text_tokens=3)), torch.device("cuda")) == {}
    fn = baselines.natten_fns(case, shape, torch.device("cuda"))["natten_ms"]
    q, k, v = (torch.randn(1, 2, 99, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = fn(q, k, v, None)
    assert calls == [(7, 7)]
    # Window 7x7 around each token, clamped: compare with the raster-order mask directly.
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(11), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    sy, sx = (ys - 3).clamp(0, 2), (xs - 3).clamp(0, 4)
    mask = ((ys[None] >= sy[:, None]) & (ys[None] < sy[:, None] + 7)
            & (xs[None] >= sx[:, None]) & (xs[None] < sx[:, None] + 7))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_pisa_keep_only_baseline():
    """Keep-or-drop over PISA's own selection: at density 1 it is dense attention; below, its mask keeps exactly
    the selected blocks (checked against the block ids PISA returns)."""
    from difattn.bench import baselines, cases

    shape = cases.Shape(TokenGrid(16, 24, text_tokens=5), heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, shape.grid.num_tokens, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    full = cases.Case("pisa", {"density": 1.0, "block_size": 64})
    token_block, selected = baselines.pisa_keep_only(full, shape, q, k, v, "torch")
    assert bool(selected.all())
    assert baselines.keep_only_error(q, k, v, token_block, selected, dense) < 1e-6
    sparse = cases.Case("pisa", {"density": 0.25, "block_size": 64})
    token_block, selected = baselines.pisa_keep_only(sparse, shape, q, k, v, "torch")
    _, blocks = __import__("difattn").pisa_attention(q, k, v, grid=shape.grid, density=0.25, block_size=64,
                                                      return_blocks=True, backend="torch")
    assert selected.sum(-1).eq(blocks.shape[-1]).all()
    assert int(token_block.bincount().max()) <= 64 and token_block.numel() == shape.grid.num_tokens
    assert baselines.keep_only_error(q, k, v, token_block, selected, dense) > 1e-3


def test_linear_work_models():
    """Linear attention's work is 4·N·D·Dv (D/N of dense); DyDiLA adds its prologue (44·N·D); forward+backward
    scales by 3 / 3.5 for both (backward 2x forward against dense's 2.5x), and by 1 for the sparse methods."""
    assert work.linear_fraction(4096, 64) == 64 / 4096
    assert work.dydila_fraction(4096, 64) == (64 + 11) / 4096
    assert work.pass_factor("dydila", True) == work.pass_factor("linear", True) == 3 / 3.5
    assert work.pass_factor("linear", False) == work.pass_factor("pisa", True) == 1.0
