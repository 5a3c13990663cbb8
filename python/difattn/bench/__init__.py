"""``difattn bench``: time each method against dense SDPA (and FlexAttention) on the device at hand."""

from .runner import BenchConfig, format_table, plot, run, write_json

__all__ = ["BenchConfig", "format_table", "plot", "run", "write_json"]
