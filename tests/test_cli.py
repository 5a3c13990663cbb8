"""The command line: `difattn info` and a tiny `difattn bench` run writing JSON with the documented schema."""

import argparse
import json
import subprocess
import sys

import pytest

from difattn.cli import main, parse_grid

RECORD_KEYS = {
    "method", "backend", "pass", "B", "H", "N", "D", "dtype", "options", "density", "ms", "ms_min", "ms_max",
    "dense_ms", "flex_ms", "work_fraction", "speedup", "efficiency", "peak_mem_mb", "rel_err_dense",
    "flex_tiled_ms", "computed_fraction", "computed_efficiency", "rel_err_ref", "grid",
}


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "difattn" in out and "compiled core" in out
    for method in ("clear", "grat", "pisa", "llsa", "dydila", "linear"):
        assert method in out


def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "difattn", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backends on cpu" in done.stdout


def test_bench_writes_json_schema(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--grid", "6x7+3", "--heads", "2", "--head-dim", "16", "--quick",
                 "--backward", "--methods", "clear", "pisa", "linear", "--out", str(path)])
    assert code == 0
    payload = json.loads(path.read_text())
    assert {"device", "torch", "triton", "commit", "threads", "matmul_gflops", "records"} <= set(payload)
    assert payload["matmul_gflops"] > 0
    records = payload["records"]
    assert {r["method"] for r in records} == {"clear", "pisa", "linear"}
    assert {r["pass"] for r in records} == {"fwd", "fwd+bwd"}
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert r["N"] == 45 and r["ms"] > 0 and r["dense_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
    clear_fwd = next(r for r in records if r["method"] == "clear" and r["pass"] == "fwd")
    # CLEAR's CPU kernels compute whole 16-lane tiles: on a grid this small they may do more than dense work.
    assert 0 < clear_fwd["work_fraction"] <= clear_fwd["computed_fraction"]
    assert clear_fwd["rel_err_ref"] < 1e-5  # the fast path agrees with the reference
    assert "speedup" in capsys.readouterr().out


@pytest.mark.parametrize("text, expect", [("64x64", (1, 64, 64, 0, "first")), ("3x8x9+7last", (3, 8, 9, 7, "last"))])
def test_parse_grid(text, expect):
    assert parse_grid(text).core_args() == expect


def test_parse_grid_rejects_garbage():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="--grid"):
        parse_grid("64by64")


def test_bench_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedup.png"
    code = main(["bench", "--device", "cpu", "--grid", "5x5", "8x8", "--heads", "1", "--head-dim", "16", "--quick",
                 "--methods", "grat", "--json", str(tmp_path / "b.json"), "--plot", str(png)])
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version(capsys):
    from difattn import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"difattn {__version__}"


def test_every_bench_flag_has_help():
    from difattn.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    missing = [a.option_strings[0] for a in bench._actions if a.option_strings and not a.help]
    assert not missing, missing


def test_bench_option_sets_a_case_and_out_takes_a_directory(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    code = main(["bench", "--device", "cpu", "--grid", "6x7+3", "--heads", "1", "--head-dim", "16", "--quick",
                 "--option", "clear.radius=2", "--option", "grat.group=(2,2)", "--out", str(out)])
    assert code == 0
    records = json.loads((out / "difattn-bench-cpu.json").read_text())["records"]
    assert {(r["method"], json.dumps(r["options"])) for r in records} == {
        ("clear", '{"radius": 2}'), ("grat", '{"group": [2, 2], "pattern": "neighbors", "reach": 1}')}
    table = capsys.readouterr().out
    assert "options" in table and "radius=2 " in table and "group=2x2, pattern=neighbors, reach=1" in table


@pytest.mark.parametrize("option, message", [("clear.bogus=1", "clear has no option 'bogus'"),
                                             ("nope.radius=1", "unknown method 'nope'")])
def test_bench_rejects_unknown_options(option, message, capsys):
    assert main(["bench", "--device", "cpu", "--grid", "6x7", "--option", option]) == 2
    assert message in capsys.readouterr().err


def test_bench_option_needs_method_dot_name():
    from difattn.cli import parse_option

    assert parse_option("grat.pattern=criss_cross") == ("grat", "pattern", "criss_cross")
    with pytest.raises(argparse.ArgumentTypeError, match="METHOD.NAME=VALUE"):
        parse_option("radius=3")


def test_bench_plot_on_cpu_times_several_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--quick", "--methods", "linear", "--out", str(path),
                 "--plot", str(tmp_path / "p.png")]) == 0
    assert sorted({r["N"] for r in json.loads(path.read_text())["records"]}) == [256, 576, 1024]


def test_bench_block_records_and_arguments(tmp_path, capsys):
    """`difattn bench --block`: one dense and one record per method and pass, speedups against the dense block;
    options that do not apply to the DiT-XL/2 block are refused (a small block here, for time)."""
    import torch

    from difattn import TokenGrid
    from difattn.bench.block import BlockConfig, format_block_table, run_block

    cfg = BlockConfig(device=torch.device("cpu"), grid=TokenGrid(16, 16), hidden=64, heads=4,
                      methods=("clear", "llsa", "linear"), budget_s=0.0)
    records = run_block(cfg)
    assert [(r["method"], r["pass"]) for r in records] == [
        (m, p) for p in ("fwd", "fwd+bwd") for m in ("dense", "clear", "llsa", "linear")]
    for r in records:
        assert r["N"] == 256 and r["D"] == 16 and r["ms"] > 0
        dense = next(d for d in records if d["method"] == "dense" and d["pass"] == r["pass"])
        assert r["dense_ms"] == dense["ms"] and r["speedup"] == pytest.approx(dense["ms"] / r["ms"])
    assert "radius=8.0" in format_block_table(records)
    assert main(["bench", "--block", "--heads", "4"]) == 2
    assert main(["bench", "--block", "--grid", "8x8", "9x9"]) == 2
    assert "--block" in capsys.readouterr().err


def test_bench_interleaved_records_and_arguments(tmp_path, capsys):
    """`difattn bench --interleaved`: dense SDPA and each method alone and between two Linear layers, with the
    documented fields (times are not asserted); CPU forward only."""
    path = tmp_path / "inter.json"
    assert main(["bench", "--interleaved", "--device", "cpu", "--grid", "16x16", "--heads", "2", "--head-dim", "8",
                 "--quick", "--methods", "linear", "llsa", "--out", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["kind"] == "interleaved" and payload["threads"] >= 1
    records = payload["records"]
    assert [(r["method"], r["backend"]) for r in records] == [("dense", "torch"), ("linear", "rust"), ("llsa", "rust")]
    keys = {"method", "backend", "options", "B", "H", "N", "D", "dtype", "grid", "alone_ms", "alone_median_ms",
            "in_chain_ms", "in_chain_median_ms", "ratio", "median_ratio", "linear_ms", "threads", "cpu_threads"}
    for r in records:
        assert set(r) == keys and r["N"] == 256 and r["D"] == 8
        assert r["ratio"] == pytest.approx(r["in_chain_ms"] / r["alone_ms"])
    assert records[1]["cpu_threads"] in ("openmp", "rayon")
    assert "in chain" in capsys.readouterr().out
    assert main(["bench", "--interleaved", "--device", "cpu", "--backward", "--quick"]) == 2
