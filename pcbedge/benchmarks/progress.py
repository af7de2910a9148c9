"""Progress of the bench's long passes: a tqdm bar on a terminal, plain lines in a log.

A bar redraws itself with carriage returns; in a CI log file every frame stays (a 500-board bench
wrote 88 KB of frames). When the stream is not a terminal, the pass instead prints one line every
``PCBEDGE_PROGRESS_SECONDS`` seconds (default :data:`LOG_EVERY_S`) and one when it ends.
"""
from __future__ import annotations

import os
import sys
import time

LOG_EVERY_S = 10.0


def _every() -> float:
    try:
        v = float(os.environ.get("PCBEDGE_PROGRESS_SECONDS", LOG_EVERY_S))
    except ValueError:
        return LOG_EVERY_S
    return v if v >= 0 else LOG_EVERY_S


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """The tqdm calls the passes use (iterate, update, close), as a line every few seconds."""

    def __init__(self, iterable, total, desc: str, unit: str, stream, every: float):
        self.iterable, self.desc, self.unit, self.stream, self.every = iterable, desc, unit, \
            stream, every
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def _line(self, final: bool) -> None:
        dt = time.monotonic() - self.t0
        of = f"/{self.total}" if self.total is not None else ""
        rate = f", {self.n / dt:.1f} {self.unit}/s" if dt > 0 else ""
        state = "done" if final else "progress"
        print(f"{self.desc}: {state} {self.n}{of} {self.unit} in {dt:.1f} s{rate}",
              file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __iter__(self):
        return iter(self.iterable)


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, stream=None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else timed plain lines;
    nothing when ``enabled`` is false. Use it like tqdm: iterate, or ``update`` and ``close``."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _Silent(iterable if iterable is not None else ())
    if _isatty(stream):
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=stream)
    return _Lines(iterable if iterable is not None else (), total, desc, unit, stream, _every())
