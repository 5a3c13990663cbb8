"""A one-line progress bar on stderr (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, *, width: int = 28, stream=None) -> None:
        self.total, self.width, self.stream = total, width, stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()

    def update(self, label: str) -> None:
        """Show ``label`` as the step now running."""
        filled = int(self.width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:5.1f}s {label[:48]:<48}")
        self.stream.flush()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        self.update("done")
        self.stream.write("\n")
        self.stream.flush()
