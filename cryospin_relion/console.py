"""Progress on the console: tqdm bars at a terminal, plain lines in a file.

A tqdm bar redraws itself with carriage returns several times a second; in a
file (RELION's ``run.out`` / ``run.err``, a SLURM log) that makes one line of
tens of kilobytes per pass. So a bar is drawn only on a terminal (tqdm draws on
stderr); otherwise progress goes to stdout as plain lines, one every
``interval_s()`` seconds (a minute, or ``$CRYOSPIN_PROGRESS_INTERVAL_S``)
within a long pass. Progress never goes to stderr when stderr is not a
terminal.

- the engine's epochs (``LineProgress``, chosen by ``lifecycle/console.py``):
  bars when stdout and stderr are both terminals, else lines through the run's
  logger (stdout and ``run.log``) next to the epoch lines;
- counting bars (``progress_bar``: caching, backprojection, projection,
  simulation): a bar when stderr is a terminal, else lines on stdout (a
  closing line for a pass that lasted at least that long; a short pass
  writes nothing), or nothing with ``lines=False`` (a command whose stdout is
  its result).

Floor 1 (standard library and tqdm only), so ``data/``, ``halfmaps.py``,
``evaluate/``, ``lifecycle/`` and ``commands/`` can all use it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

INTERVAL_S = 60.0
INTERVAL_ENV = "CRYOSPIN_PROGRESS_INTERVAL_S"


def interval_s() -> float:
    """Seconds between plain progress lines: ``$CRYOSPIN_PROGRESS_INTERVAL_S`` when set to a number >= 0,
    else a minute."""
    try:
        v = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return INTERVAL_S
    return v if v >= 0 else INTERVAL_S


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def is_terminal() -> bool:
    """True when the engine's progress may be drawn as bars: stdout and stderr are both terminals."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def say_stdout(msg: str) -> None:
    """One line on stdout, flushed (stdout in a file is block-buffered)."""
    print(msg, file=sys.stdout, flush=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """The engine's ``Progress`` (engine/progress.py) as plain lines, at most one per ``interval_s``.

    ``say`` writes a line (the run's ``logger.info``, so the lines reach ``run.log`` too).
    Within a pass: ``<desc>: batch i/total (p%) loss L, N img/s, ETA 3m05s`` every
    ``interval_s``; nothing at the end of a pass (the engine logs each epoch's line).
    ``clock`` is injectable for tests.
    """

    def __init__(self, say: Callable[[str], None] = say_stdout, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.say, self.clock = say, clock
        self.interval_s = interval_s() if interval is None else float(interval)
        self.desc, self.total, self.done, self._done0 = "", 0, 0, 0
        self._t0 = self._last = 0.0

    def start(self, desc: str, total: int, done: int) -> None:
        self.desc, self.total, self.done, self._done0 = desc, int(total), int(done), int(done)
        self._t0 = self._last = self.clock()

    def update(self, loss: float | None, images_per_s: float | None) -> None:
        self.done += 1
        now = self.clock()
        if now - self._last < self.interval_s or self.done >= self.total:
            return
        self._last = now
        self.say(self.line(now, loss, images_per_s))

    def line(self, now: float, loss: float | None, images_per_s: float | None) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        msg = f"{self.desc}: batch {self.done}/{self.total} ({pct:.0f}%)"
        if loss is not None:
            msg += f" loss {loss:.5g}"
        if images_per_s is not None:
            msg += f", {images_per_s:.0f} img/s"
        ran = self.done - self._done0
        if ran > 0:
            msg += f", ETA {duration((now - self._t0) / ran * (self.total - self.done))}"
        return msg

    def close(self) -> None:
        pass


class LineBar:
    """A counting bar (``update(n)``) as plain lines: one per ``interval_s`` within the pass, and a closing
    line when the pass lasted at least that long. ``desc: 5000/20000 img (25%), 830 img/s, ETA 18s``."""

    def __init__(self, total: int, desc: str, unit: str = "it", say: Callable[[str], None] = say_stdout,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.say, self.clock = say, clock
        self.interval_s = interval_s() if interval is None else float(interval)
        self.n = 0
        self._t0 = self._last = clock()
        self._said = False
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = self.clock()
        if now - self._last >= self.interval_s and self.n < self.total:
            self._last = now
            self._said = True
            rate = self.n / max(now - self._t0, 1e-9)
            pct = 100.0 * self.n / max(self.total, 1)
            self.say(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {rate:.0f} {self.unit}/s, "
                     f"ETA {duration((self.total - self.n) / max(rate, 1e-9))}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = self.clock()
        if self._said or now - self._t0 >= self.interval_s:
            self.say(f"{self.desc}: {self.n}/{self.total} {self.unit} in {duration(now - self._t0)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True, leave: bool = True,
                 lines: bool = True):
    """A counting progress bar (``update(n)``, ``close()``, a context manager): a tqdm bar when stderr is a
    terminal; otherwise ``LineBar`` (plain lines on stdout, none for a short pass), or nothing when not
    ``lines``; nothing when not ``enabled``."""
    if not enabled:
        return _NoBar()
    if _isatty(sys.stderr):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave)
    return LineBar(total, desc, unit) if lines else _NoBar()
