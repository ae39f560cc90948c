"""Progress of a campaign: a bar on a terminal, a periodic one-line report without one (CI logs).

Records arrive in bursts -- a unit's records all come once its adversarial batch is crafted -- so the
remaining time is estimated from the average rate since the start (never from the last burst), and the
bar counts records, the unit the runner writes.
"""
from __future__ import annotations

import logging
import sys
import time

LOG = logging.getLogger("robustvtc")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """``update(n)`` after each written record; a tqdm bar on a terminal, else a log line every ``every`` s."""

    def __init__(self, name: str, total: int, done: int = 0, quiet: bool = False, every: float = 30.0,
                 stream=None):
        self.name, self.total, self.start_done, self.done = name, total, done, done
        self.every, self.started = every, time.monotonic()
        self._last = self.started
        stream = stream or sys.stderr
        self.bar = None
        self.lines = not quiet and not stream.isatty()
        if not quiet and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="rec", desc=name, file=stream, dynamic_ncols=True,
                            smoothing=0)  # the average rate: bursts would make a recent rate swing

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            LOG.info(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        new = self.done - self.start_done
        left = (self.total - self.done) * elapsed / new if new else None
        share = 100 * self.done / self.total if self.total else 100.0
        eta = f", about {_duration(left)} left" if left is not None and self.done < self.total else ""
        return f"{self.name}: {self.done}/{self.total} records ({share:.1f} %), {_duration(elapsed)} elapsed{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            LOG.info(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
