"""Progress on long work: a rich bar on a terminal, periodic plain lines otherwise, both on
stderr (messages, never data; inside a Prefect run, log_prints sends the lines to its logs).

Rate and ETA are measured over a moving window of recent updates, starting at the first
update: the time before it (data loader start, model warm-up, the first batch) and a slow
start long past never stretch the estimate of what is left. Work that completes in bursts
(Dask shards) counts from the start instead (`since_start`): between two bursts the rate
would be a burst's size over a second.
"""

from __future__ import annotations

import sys
import time
from collections import deque

_LAST: list[Progress] = []  # the newest Progress, kept after close (the interrupted line)


def last_progress() -> Progress | None:
    """The Progress made last in this process (closed or not): what an interrupt stopped."""
    return _LAST[0] if _LAST else None


class MovingRate:
    """Items per second over the last `window_s` seconds of updates (None until two updates
    lie apart in time: a rate is a difference, never a guess from one batch)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float | None:
        """Record `done` items at time `now`; the rate over the window."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


class Progress:
    """Counts items with a measured rate and ETA; plain lines when stderr is not a tty."""

    def __init__(self, label: str, total: int, every_s: float = 10.0,
                 window_s: float = 30.0, since_start: bool = False) -> None:
        self.label, self.total, self.done, self.every_s = label, total, 0, every_s
        _LAST[:] = [self]
        self.t0 = self.last = time.perf_counter()
        self.rate = MovingRate(window_s)
        if since_start:
            self.rate.add(self.t0, 0)
        self._bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            # rich's own ETA is a moving window too (speed_estimate_period)
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), speed_estimate_period=window_s)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, rate="")

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.rate.add(now, self.done)
        # shown: the moving rate, or the average so far (the ETA waits for a measured rate)
        average = self.done / (now - self.t0) if now > self.t0 else None
        shown = "?" if (rate or average) is None else f"{rate or average:.1f}"
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{shown} img/s")
        elif now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            left = self.total - self.done
            eta = "0" if left <= 0 else ("?" if not rate else f"{left / rate:.0f}")
            print(f"{self.label}: {self.done}/{self.total}, {shown}/s, ETA {eta} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
