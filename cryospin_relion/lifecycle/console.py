"""What a run shows: ``run.log`` in the output folder, console lines, and progress (bars or plain lines)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cryospin_relion.console import LineProgress, is_terminal

LOGGER = "cryospin.abinit"


def open_log(out_dir: Path, quiet: bool) -> logging.Logger:
    """The run's logger: ``out_dir/run.log`` (time-stamped), and stdout unless ``quiet``."""
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.INFO)
    log.propagate = False
    close_log()
    fh = logging.FileHandler(out_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(fh)
    if not quiet:
        ch = logging.StreamHandler(sys.stdout)
        ch.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(ch)
    return log


def rank_log(rank: int) -> logging.Logger:
    """The logger of a data-parallel rank other than 0: warnings and errors to stderr, no run.log."""
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.WARNING)
    log.propagate = False
    close_log()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"rank {rank}: %(message)s"))
    log.addHandler(h)
    return log


def close_log() -> None:
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


class TqdmProgress:
    """The engine's ``Progress`` as tqdm bars (one per pass over batches, removed when it ends)."""

    def __init__(self):
        self._bar = None

    def start(self, desc: str, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, desc=desc, leave=False, dynamic_ncols=True, unit="batch")

    def update(self, loss: float | None, images_per_s: float | None) -> None:
        self._bar.update(1)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{images_per_s:.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_progress(log: logging.Logger, interval: float | None = None):
    """The engine's progress sink for a run: tqdm bars at a terminal; otherwise plain lines through the
    run's logger (stdout and ``run.log``), one per ``interval`` seconds within a long epoch (default
    ``cryospin_relion.console.interval_s()``, a minute)."""
    return TqdmProgress() if is_terminal() else LineProgress(log.info, interval)
