"""A batch's figures summed on the device; the host reads them a few times per epoch, not once per batch.

Why: on CUDA, reading a number from the device (``float(loss)``, ``.tolist()``, ``torch.bincount``, which reads
its maximum) makes the host wait until the GPU has finished everything queued before it. One read per batch
stops the host from queuing the next batch while the GPU works on this one. So each batch's mean loss, head
wins and winner sources are added into one small float64 tensor on the device (``PendingSums.add``), and the
host reads it at an epoch's end, a checkpoint or a stop (``drain``, summed over the ranks there: one
collective instead of one per batch), and for the progress bar at most every few seconds (``peek_loss``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_relion.engine.distributed import World
from cryospin_relion.engine.history import WINNER_SOURCES


def value_counts(x: Tensor, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(n,) how many entries of ``x`` (long, any shape, values in [0, n)) equal 0, 1, ..., n - 1.

    ``torch.bincount`` without its read of ``x.max()`` to the host (CUDA)."""
    x = x.reshape(-1)
    return torch.zeros(n, dtype=dtype, device=x.device).index_add_(0, x, torch.ones(x.shape, dtype=dtype,
                                                                                     device=x.device))


class PendingSums:
    """This rank's sums over the running epoch's batches, on the device, and what of them the host has read.

    Layout of the device vector: [sum of loss x images, head wins (heads), winner sources (WINNER_SOURCES)].
    The image count is kept on the host (batch sizes are known there)."""

    def __init__(self, heads: int, device: torch.device | str):
        self.heads = heads
        self._v = torch.zeros(1 + heads + len(WINNER_SOURCES), dtype=torch.float64, device=device)
        self._read = [0.0] * self._v.numel()  # the part of _v already drained
        self.images = 0  # this rank's images added since the epoch began (or the run resumed)
        self._drained_images = 0

    def reset(self) -> None:
        """A new epoch (after its predecessor's ``drain``)."""
        self._v.zero_()
        self._read = [0.0] * self._v.numel()
        self.images = self._drained_images = 0

    def add(self, loss: Tensor, n: int, wins: Tensor | None = None, sources: Tensor | None = None) -> None:
        """One batch of this rank: its mean loss over its ``n`` images (0-dim tensor), the best head (B,) and
        winner source (B,) (WINNER_SOURCES index) of each image, or None (stage 2). No host read."""
        h = self.heads
        self._v[:1].add_(loss.detach().reshape(1).to(torch.float64), alpha=float(n))
        if wins is not None:
            self._v[1:1 + h].add_(value_counts(wins, h))
        if sources is not None:
            self._v[1 + h:].add_(value_counts(sources, len(WINNER_SOURCES)))
        self.images += n

    def peek_loss(self) -> float | None:
        """This rank's mean loss over the epoch's batches so far (one host read; None before any batch)."""
        if self.images == 0:
            return None
        return float(self._v[0]) / self.images

    def drain(self, world: World) -> tuple[float, list[int], list[int], list[int]]:
        """What was added since the last drain, summed over the ranks (a collective: every rank calls it at the
        same point): (sum of loss x images, head wins, winner sources, images per rank)."""
        now = self._v.tolist()
        delta = [a - b for a, b in zip(now, self._read)]
        self._read = now
        mine = [0.0] * world.size
        mine[world.rank] = float(self.images - self._drained_images)
        self._drained_images = self.images
        v = world.sum_floats(delta + mine)
        h, s = self.heads, len(WINNER_SOURCES)
        counts = [int(round(x)) for x in v[1:]]
        return v[0], counts[:h], counts[h:h + s], counts[h + s:]
