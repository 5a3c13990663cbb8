"""Test tiers: tier 0 runs everywhere; tier 2 (`gpu`) is skipped without CUDA."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "difattn", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("DIFATTN_HYPOTHESIS_PROFILE", "difattn"))

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="tier 2 needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
