"""Test tiers: tier 0 runs everywhere; tier 1 (`interpreter`) runs the Triton kernels on CPU tensors under
TRITON_INTERPRET=1 when there is no GPU; tier 2 (`gpu`) is skipped without CUDA."""

import os

import torch

# Triton decides at kernel definition whether to interpret, so set this before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets  # noqa: E402

import hypothesis  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Local runs: the same examples every run (derandomize), so a failure reproduces by rerunning. CI
# (DIFATTN_HYPOTHESIS_PROFILE=ci, set by .ci/run): fresh examples every run from one seed printed in pytest's header
# and last line (DIFATTN_HYPOTHESIS_SEED=<seed> repeats them), and a failure prints its @reproduce_failure blob.
settings.register_profile(
    "difattn", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("ci", settings.get_profile("difattn"), derandomize=False, print_blob=True, database=None)
PROFILE = os.environ.get("DIFATTN_HYPOTHESIS_PROFILE", "difattn")
settings.load_profile(PROFILE)
SEED = int(os.environ.get("DIFATTN_HYPOTHESIS_SEED") or secrets.randbelow(2**32)) if PROFILE == "ci" else None

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

CPU_ISAS = ("scalar", "avx2", "avx512", "avx512bf16")


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs the test with every CPU kernel on one instruction-set level (``_core.set_cpu_isa``), once per level;
    levels this CPU lacks are skipped with a message naming the level."""
    from difattn._native import core, core_status

    if not core_status()[0]:
        pytest.skip("the compiled core is missing")
    level = request.param
    _, supported, features = core().cpu_isa()
    if level not in supported:
        pytest.skip(f"this CPU lacks the {level} instruction set (it has: {' '.join(features) or 'the baseline only'})")
    core().set_cpu_isa(level)
    try:
        yield level
    finally:
        core().set_cpu_isa(None)


def _hypothesis_line() -> str:
    if SEED is None:
        return f"hypothesis: profile {PROFILE!r} (fixed examples)"
    return f"hypothesis: profile {PROFILE!r}, seed {SEED} (DIFATTN_HYPOTHESIS_SEED={SEED} draws these examples again)"


def pytest_report_header(config):
    return _hypothesis_line()


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end (``-q`` hides the header), where a failing CI log is read."""
    if SEED is not None:
        terminalreporter.write_line(_hypothesis_line())


def pytest_collection_modifyitems(config, items):
    if SEED is not None:
        for item in items:
            test = getattr(item, "obj", None)
            if test is not None and hypothesis.is_hypothesis_test(test):
                hypothesis.seed(SEED)(getattr(test, "__func__", test))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="tier 2 needs a CUDA device")
    try:
        import triton  # noqa: F401
        skip_interp = None
    except ImportError:
        skip_interp = pytest.mark.skip(reason="tier 1 needs triton installed")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif skip_interp is not None and "interpreter" in item.keywords:
            item.add_marker(skip_interp)
