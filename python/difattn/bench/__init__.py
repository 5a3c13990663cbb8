"""``difattn bench``: time each method against dense SDPA on the device at hand."""

from .runner import BenchConfig, run

__all__ = ["BenchConfig", "run"]
