"""Progress for long steps: shown on a terminal, silent when stderr is not a TTY."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def step(label: str, stream=None) -> Iterator[None]:
    """`with step("tracing"):` prints 'tracing ...' then 'tracing done in 1.2 s' on a TTY."""
    stream = stream or sys.stderr
    live = hasattr(stream, "isatty") and stream.isatty()
    t0 = time.perf_counter()
    if live:
        stream.write(f"{label} ...")
        stream.flush()
    try:
        yield
    finally:
        if live:
            stream.write(f"\r{label} done in {time.perf_counter() - t0:.1f} s\n")
            stream.flush()


def bar(done: int, total: int, label: str = "", stream=None) -> None:
    """A one-line progress bar, redrawn in place; silent off a TTY."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()) or total <= 0:
        return
    width = 30
    filled = int(width * done / total)
    stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        stream.write("\n")
    stream.flush()
