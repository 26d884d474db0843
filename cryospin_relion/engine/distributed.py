"""Data parallelism: this process's place among the ranks of a run, and the few collectives the engine uses.

A data-parallel run (``torchrun --nproc_per_node G cryospin abinit ...``) has G
ranks that all run the same schedule (engine/schedule.py: every batch order and
random stream comes from the seed, so every rank knows the global batches).
Each global batch is split by position into G near-equal consecutive parts, and
rank r computes the r-th (``World.share``). The volume and the encoder are
replicated; their gradients are summed over the ranks before every optimiser
step, each rank's loss being divided by the *global* batch size, and batch norm
takes its statistics over the global batch (model/global_norm.py). So one step of
G ranks is the step of one process on the same global batch, up to the order of
floating-point sums, and the random numbers of the pose search are drawn for the
whole batch (engine/stage1.py ``search_poses``), so every image gets the ones it
gets in one process. Why split by position and not give each rank a fixed shard
of the particles: then every rank has a part of every step (with a fixed shard,
at 8 ranks and 64 images a rank has no image of some batches, yet it must join
every batch-norm collective); the batch size must be at least 2 x G.

The per-particle tables (poses, pose memory, per-row Adam state) are whole on
every rank; a row is updated by the rank that had it in its part of a batch,
once per epoch. ``AbinitEngine.sync`` merges them (``merge_rows``: the rank that
updated a row gives it to all) at every epoch end, after the first-pose pass and
before a checkpoint. After a merge every rank holds the same state, so rank 0
alone writes checkpoints and outputs, and a run may resume with another number
of ranks (the global schedule does not depend on G).

``World()`` is the single process: every collective is then a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor


@dataclass(frozen=True)
class World:
    """Rank ``rank`` of ``size`` (``size`` 1: alone). ``comm_device``: where collectives run (the CPU for
    gloo, the rank's GPU for NCCL)."""

    rank: int = 0
    size: int = 1
    comm_device: torch.device = torch.device("cpu")

    @property
    def alone(self) -> bool:
        return self.size == 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def share(self, n: int) -> Tensor:
        """Positions (a CPU index tensor) of this rank's part of a global batch of ``n``: the r-th of
        ``size`` near-equal consecutive parts (every rank gets one when n >= size)."""
        if self.alone:
            return torch.arange(n)
        return torch.tensor_split(torch.arange(n), self.size)[self.rank]

    def sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place (every rank gets the same result); returns ``t``."""
        if self.alone:
            return t
        import torch.distributed as dist

        if t.device == self.comm_device:
            dist.all_reduce(t)
            return t
        c = t.to(self.comm_device)
        dist.all_reduce(c)
        t.copy_(c)
        return t

    def from_main_(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank, in place (a broadcast); returns ``t``."""
        if self.alone:
            return t
        import torch.distributed as dist

        c = t if t.device == self.comm_device else t.to(self.comm_device)
        dist.broadcast(c, 0)
        if c is not t:
            t.copy_(c)
        return t

    def sum_floats(self, values: Iterable[float]) -> list[float]:
        """Sum a few numbers over the ranks (one collective)."""
        v = list(values)
        if self.alone:
            return v
        return self.sum_(torch.tensor(v, dtype=torch.float64, device=self.comm_device)).tolist()

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on any rank (a collective decision: every rank takes the same
        branch, so none waits forever in a collective that the others skipped)."""
        if self.alone:
            return tuple(bool(f) for f in flags)
        s = self.sum_floats(float(bool(f)) for f in flags)
        return tuple(x > 0 for x in s)

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks (one flat collective). A parameter without a
        gradient on this rank (e.g. no rows of the batch here) contributes zeros."""
        if self.alone:
            return
        ps = list(params)
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        self.sum_(flat)
        a = 0
        for p in ps:
            n = p.numel()
            p.grad.copy_(flat[a:a + n].view_as(p))
            a += n

    def merge_rows(self, t: Tensor, mine: Tensor, count: Tensor) -> Tensor:
        """Every row of ``t`` (N, ...) from the rank that updated it, in place. ``mine``: (N,) bool, the
        rows this rank updated since the last merge; ``count``: (N,) how many ranks did (``mine`` summed
        over the ranks: 0 or 1). Rows nobody updated are the same on every rank and stay; the others are
        zeroed except on their rank and the copies summed, which is exact."""
        if self.alone:
            return t
        mine, keep = mine.to(t.device), (count == 0).to(t.device)
        kept = t[keep].clone()
        t[~mine] = 0
        self.sum_(t)
        t[keep] = kept
        return t

    def barrier(self) -> None:
        if not self.alone:
            import torch.distributed as dist

            dist.barrier()


ALONE = World()
