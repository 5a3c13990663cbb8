"""Timers: CUDA events through ``triton.testing.do_bench`` on GPU (reported: the median), wall clock on CPU
(reported: the fastest repeat, since other work on a shared host only ever adds time to a call), also of one call
between others (``time_cpu_between``: a layer between the layers around it)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the timed repeats (warm-up excluded): ``typical`` is the number the bench reports
    (CPU: the minimum, CUDA: the median)."""

    typical: float
    median: float
    minimum: float
    maximum: float
    repeats: int


def time_cpu(fn: Callable[[int], object], *, min_repeats: int = 5, max_repeats: int = 15, budget_s: float = 2.0) -> Timing:
    """Wall time of ``fn(i)`` on CPU (typical: the fastest repeat); ``i`` rotates the inputs. One warm-up call is
    excluded; repeats stop after ``budget_s`` once ``min_repeats`` are done."""
    return time_cpu_between(lambda i: None, fn, lambda out, i: None, min_repeats=min_repeats, max_repeats=max_repeats,
                            budget_s=budget_s)


def time_cpu_between(before: Callable[[int], object], fn: Callable[[int], object], after: Callable[[object, int], object],
                     *, min_repeats: int = 5, max_repeats: int = 15, budget_s: float = 2.0) -> Timing:
    """Wall time of ``fn(i)`` alone when each call comes right after ``before(i)`` and is followed by
    ``after(fn's result, i)`` (what a layer costs between the layers around it), as :func:`time_cpu` counts it."""
    before(0)  # the warm-up call
    after(fn(0), 0)
    samples: list[float] = []
    start = time.perf_counter()
    for i in range(1, max_repeats + 1):
        before(i)
        t0 = time.perf_counter()
        out = fn(i)
        samples.append((time.perf_counter() - t0) * 1e3)
        after(out, i)
        if len(samples) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return Timing(min(samples), statistics.median(samples), min(samples), max(samples), len(samples))


def time_cuda(fn: Callable[[int], object]) -> Timing:
    """CUDA-event timing via ``triton.testing.do_bench`` (median, min, max quantiles), inputs rotated."""
    from triton.testing import do_bench

    counter = iter(range(1 << 30))
    med, lo, hi = do_bench(lambda: fn(next(counter)), quantiles=[0.5, 0.0, 1.0])
    return Timing(med, med, lo, hi, -1)


def time_call(fn: Callable[[int], object], device: torch.device, **cpu_options) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn)
    return time_cpu(fn, **cpu_options)
