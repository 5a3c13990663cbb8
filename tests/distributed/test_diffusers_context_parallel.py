"""A tiny FLUX transformer under diffusers' own context parallelism (``enable_parallelism`` with the model's
``_cp_plan``) on 2 gloo processes gives what the same transformer gives on one process, with difattn's layers
running their exact sharded schemes: CLEAR and GRAT by halo exchange, PISA by Ulysses, and CLEAR forced to Ulysses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers tests need diffusers (the 'test' extra)")

import difattn.diffusers
from difattn.testing import assert_close

CASES = (
    ("clear", "auto", {"radius": 2.0}),
    ("clear", "ulysses", {"radius": 2.0}),
    ("grat", "auto", {"group": (2, 2)}),
    ("pisa", "auto", {"density": 0.5, "block_size": 4}),
)


def _flux_context_parallel(rank: int, world: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffusers import ContextParallelConfig
    from diffusers_tiny import flux, run

    # diffusers 0.42.1 places each rank on device `rank % torch.accelerator.device_count()`, which divides by
    # zero on a machine without an accelerator; one "device" (the CPU) is what it needs here.
    torch.accelerator.device_count = lambda: 1
    model, inputs = flux()
    model = model.double()
    kwargs = {k: v.double() if v.is_floating_point() else v for k, v in inputs(6, 4, text=6, batch=2).items()}
    single = {}
    for method, parallel, options in CASES:
        difattn.diffusers.apply(model, method, backend="torch", **options)
        single[method, parallel] = run(model, kwargs)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    for method, parallel, options in CASES:
        difattn.diffusers.apply(model, method, parallel=parallel, backend="torch", **options)
        out = run(model, kwargs)
        assert_close(f"FLUX {method} parallel={parallel}", out, single[method, parallel], single[method, parallel])


def test_flux_under_diffusers_context_parallelism_equals_one_process(ranks):
    ranks(2).run(_flux_context_parallel, timeout=120)
