"""The README's Python snippets run as written, in order, in one namespace (as a reader would paste them).

A comment on the line before a block changes how it runs:

- ``<!-- readme-test: skip REASON -->``: not run (e.g. it needs several processes or a GPU).
- ``<!-- readme-test: offline -->``: run with the Hub's weights replaced by tiny random ones: diffusers'
  ``FluxPipeline.from_pretrained`` returns the tiny pipeline of ``examples/tiny_flux_pipeline_cpu.py`` and timm's
  ``create_model`` builds the model from its config without ``pretrained`` weights. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!-- readme-test: (skip|offline)\b(.*?)-->")


def readme_blocks() -> list[tuple[int, str, str | None, str]]:
    """``(line, code, marker, reason)`` for every python block of the README, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), marker and marker.group(1), marker and marker.group(2).strip()))
    return blocks


def _load_example():
    path = ROOT / "examples" / "tiny_flux_pipeline_cpu.py"
    spec = importlib.util.spec_from_file_location("tiny_flux_pipeline_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _offline(monkeypatch) -> None:
    """Hub loads replaced by tiny random models (see the module docstring)."""
    diffusers = pytest.importorskip("diffusers", reason="the README's diffusers block needs diffusers")
    timm = pytest.importorskip("timm", reason="the README's timm block needs timm")
    tiny = _load_example().tiny_flux_pipeline
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: tiny()))
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **k: create(name, pretrained=False, **k))


def test_readme_has_python_blocks_and_valid_markers():
    blocks = readme_blocks()
    assert len(blocks) >= 4
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- readme-test:") == sum(marker is not None for _, _, marker, _ in blocks), \
        "a readme-test marker that is not on the line right before a python block"
    assert all(reason for _, _, marker, reason in blocks if marker == "skip"), "a skip marker without its reason"


def test_readme_python_blocks_run(monkeypatch):
    namespace: dict = {"__name__": "readme"}
    ran = 0
    for line, code, marker, reason in readme_blocks():
        if marker == "skip":
            continue
        if marker == "offline":
            _offline(monkeypatch)
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the README block at line {line} failed: {err!r}") from err
        ran += 1
    assert ran >= 3
