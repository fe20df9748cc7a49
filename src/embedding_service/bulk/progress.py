"""Progress of a bulk job: a tqdm bar on a terminal, plain periodic log lines otherwise, one summary line."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts texts done; `bar` None means: a bar only when stderr is a terminal."""

    def __init__(self, total: int, initial: int = 0, *, bar: bool | None = None, log_every_s: float = 30.0,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.done = initial
        self.initial = initial
        self.started = time.monotonic()
        self.log_every_s = log_every_s
        self._last_log = self.started
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="text", unit_scale=True, dynamic_ncols=True,
                             file=self.stream, smoothing=0.1)

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        rate = (self.done - self.initial) / max(elapsed, 1e-9)
        left = self.total - self.done
        eta = format_seconds(left / rate) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (f"embedding-service embed: {self.done}/{self.total} rows ({percent:.1f}%), {rate:.1f} texts/s, "
                f"elapsed {format_seconds(elapsed)}, ETA {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
