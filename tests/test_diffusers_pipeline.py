"""``examples/tiny_flux_pipeline_cpu.py``: a whole FLUX pipeline of tiny random parts runs on CPU with ``apply``
(prompt encoding, denoising loop, VAE decoding; no downloads), and ``remove`` gives the stock images back."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the pipeline example needs diffusers (the 'test' extra)")


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "tiny_flux_pipeline_cpu.py"
    spec = importlib.util.spec_from_file_location("tiny_flux_pipeline_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["clear", "grat", "pisa", "llsa"])
def test_tiny_flux_pipeline_example_runs(method):
    result = _example().main(["--method", method, "--size", "32", "--steps", "2"])
    assert len(result["layers"]) == 4  # 2 double-stream and 2 single-stream blocks
    assert result["max_abs_diff_vs_stock"] > 0  # the method ran: the images differ from the stock ones
