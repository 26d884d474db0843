"""SIGINT / SIGTERM as a stop request: the engine stops at the next batch boundary, the run checkpoints.

A second signal gives up at once (KeyboardInterrupt). Exit codes follow the shell's
convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import logging
import signal


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set ``requested`` instead of ending the process."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 143 if self.signum == signal.SIGTERM else 130

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        self.log.info(f"received {signal.Signals(signum).name}: finishing the current batch, then checkpointing")

    def __enter__(self) -> "StopOnSignal":
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        except ValueError:  # not the main thread: signals stay as they are
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
