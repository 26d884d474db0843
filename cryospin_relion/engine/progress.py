"""How the engine reports progress: a sink that the run lifecycle draws (bars, plain lines), or nothing."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where the engine reports the progress of a pass over batches (the lifecycle draws it)."""

    def start(self, desc: str, total: int, done: int) -> None: ...

    def update(self, loss: float | None, images_per_s: float | None) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, desc: str, total: int, done: int) -> None:
        pass

    def update(self, loss: float | None, images_per_s: float | None) -> None:
        pass

    def close(self) -> None:
        pass
