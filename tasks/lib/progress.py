"""Progress on long work: a rich bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts items with rate and ETA; plain lines (shown in Prefect's logs) when not a tty."""

    def __init__(self, label: str, total: int, every_s: float = 10.0) -> None:
        self.label, self.total, self.done, self.every_s = label, total, 0, every_s
        self.t0 = self.last = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, rate="")

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{rate:.1f} img/s")
        elif now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.label}: {self.done}/{self.total}, {rate:.1f}/s, ETA {eta:.0f} s",
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
