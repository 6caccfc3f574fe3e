"""What the CLI prints: aligned tables and a progress bar on a terminal."""
from __future__ import annotations

import threading
import time
from typing import IO


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells, the first being the header, in aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


class Progress:
    """A one-line progress bar, drawn only when the stream is a terminal."""

    def __init__(self, total: int, stream: IO[str], width: int = 30, unit: str = "rows"):
        self.total = total
        self.stream = stream
        self.width = width
        self.unit = unit
        self.shown = stream.isatty()
        self.closed = False

    def update(self, done: int) -> None:
        if not self.shown:
            return
        fraction = done / self.total if self.total else 1.0
        filled = int(self.width * min(fraction, 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} {self.unit} ({fraction:.0%})")
        self.stream.flush()

    def close(self) -> None:
        if self.shown and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True


class Steps:
    """The steps of a slow command, each announced (with the time since the
    command began) once it has run for `after` seconds: a long publish or
    train says what it is doing, a quick one stays quiet."""

    def __init__(self, stream: IO[str], after: float = 0.5):
        self.stream, self.after = stream, after
        self.started = time.monotonic()
        self.timer: threading.Timer | None = None

    def __call__(self, step: str) -> None:
        self.cancel()
        self.timer = threading.Timer(self.after, self.announce, (step, time.monotonic() - self.started))
        self.timer.daemon = True
        self.timer.start()

    def announce(self, step: str, at: float) -> None:
        self.stream.write(f"[{at:5.1f} s] {step}\n")
        self.stream.flush()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
