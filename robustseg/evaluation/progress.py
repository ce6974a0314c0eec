"""Progress of an evaluation: items done / total with elapsed time and an ETA.

An item is one case under one (source, attack, budget) of the suite, or one case's clean scoring. On a terminal
the progress is a ``tqdm`` bar when tqdm is installed; otherwise (a log file, SLURM) one log line per finished
item: ``evaluate: 7/24 (29%) case003 unet pgd@8/255 | elapsed 1m04s, ETA 2m35s``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("robustseg.evaluation.progress")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts finished items against ``total``; reports each one (tqdm bar on a terminal, else a log line).

    Args:
        total: number of items this run will finish (skipped items count as done immediately).
        bar: force the tqdm bar on (True) or off (False); None picks it when stderr is a terminal.
    """

    def __init__(self, total: int, *, bar: bool | None = None, clock: Any = time.monotonic) -> None:
        self.total = int(total)
        self.done = 0
        self.computed = 0  # items finished by this run (skipped ones do not set the pace)
        self.clock = clock
        self.start = clock()
        self.lines: list[str] = []  # what was reported, for tests and the run file
        self._bar = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: fall back to log lines
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc="evaluate", unit="item", dynamic_ncols=True)

    def eta(self) -> float | None:
        """Seconds left at the mean pace so far; None before the first item."""
        if self.computed == 0:
            return None
        elapsed = self.clock() - self.start
        return elapsed / self.computed * max(self.total - self.done, 0)

    def skip(self, n: int) -> None:
        """Mark ``n`` items done before this run (already in the log): counted, not reported one by one."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def update(self, what: str, n: int = 1) -> str:
        """Mark ``n`` items finished (``what`` names them) and report; returns the line."""
        self.done += n
        self.computed += n
        elapsed = self.clock() - self.start
        eta = self.eta()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = (
            f"evaluate: {self.done}/{self.total} ({pct:.0f}%) {what} | elapsed {_clock(elapsed)}, "
            f"ETA {_clock(eta) if eta is not None else '?'}"
        )
        self.lines.append(line)
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(n)
        else:
            log.info(line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
