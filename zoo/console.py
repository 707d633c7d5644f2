"""What zoo's commands print: a line on rank 0 only (say), and a progress line redrawn in place (Progress)."""
import sys
import time

from zoo import parallel


def say(*args, **kwargs) -> None:
    if parallel.rank() == 0:
        print(*args, **kwargs)


class Progress:
    """One line on stderr, redrawn in place (\\r) at most 10 times a second, rank 0 only: done/total and a rate."""

    def __init__(self, label: str, unit: str):
        self.label, self.unit, self.start, self.drawn, self.length = label, unit, time.perf_counter(), 0.0, 0

    def __call__(self, done: int, total: int, note: str = "") -> None:
        now = time.perf_counter()
        if now - self.drawn < 0.1 and done < total:
            return
        self.drawn, width = now, 24
        bar = "#" * (width * done // max(total, 1))
        rate = done / (now - self.start) if now > self.start else 0.0
        line = f"{self.label} [{bar:<{width}}] {done:,}/{total:,} {self.unit} {rate:,.0f} {self.unit}/s{note}"
        say(f"\r{line:<{self.length}}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        self.length = len(line)  # a shorter line next time is padded over this one
