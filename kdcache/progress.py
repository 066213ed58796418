"""Progress of the long steps (prepare, dump-teacher, train-student), seen on a terminal and in a log.

On a terminal the steps draw tqdm bars. Anywhere else (a pipe, a file, `make demo | tee demo.log`, CI),
tqdm draws nothing (or carriage returns a log cannot show), so the steps log a plain line (INFO) every
`interval` seconds instead: where the step is, its rate and its ETA; the command line prints it on stderr
(kdcache.log). The interval is 10 s, or KDCACHE_PROGRESS_INTERVAL seconds (0: at every update).
`--no-progress` turns both off.
"""

import logging
import os
import sys
import time
from typing import Optional, TextIO

DEFAULT_INTERVAL = 10.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("KDCACHE_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def rate_eta(done: float, total: Optional[float], seconds: float, unit: str = "img") -> str:
    """'650 img/s, ETA 1.3 min' from `done` of `total` items in `seconds` (no ETA without a total)."""
    rate = done / seconds if seconds > 0 else 0.0
    text = f"{rate:.0f} {unit}/s"
    if total is not None and rate > 0:
        text += f", ETA {duration(max(0.0, total - done) / rate)}"
    return text


class ProgressLines:
    """Plain progress lines, at most one per interval, where tqdm's bar cannot be seen: `file` (where the bar
    would be drawn, stderr) is not a terminal. Each line is an INFO record of `logger` (default: this module's)."""

    def __init__(self, enabled: bool = True, file: Optional[TextIO] = None, interval: Optional[float] = None,
                 logger: Optional[logging.Logger] = None):
        self.file = file if file is not None else sys.stderr
        self.logger = logger or logging.getLogger(__name__)
        self.active = enabled and not is_terminal(self.file)
        self.interval = _interval() if interval is None else interval
        self.next = time.time() + self.interval

    def due(self) -> bool:
        return self.active and time.time() >= self.next

    def line(self, text: str) -> None:
        self.logger.info(text)
        self.next = time.time() + self.interval

    def tqdm_disabled(self, enabled: bool = True) -> Optional[bool]:
        """tqdm's `disable`: off where these lines are on or progress is off; else None (tqdm: a bar on a
        terminal only)."""
        return True if (self.active or not enabled) else None
