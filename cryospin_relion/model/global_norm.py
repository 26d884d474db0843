"""Batch normalisation over the global batch of a data-parallel run.

In a data-parallel run (engine/distributed.py) each rank sees its share of a
global batch. ``nn.BatchNorm2d`` would normalise each share by its own statistics,
so G ranks would train another network than one process on the same batches (and
the ranks' running statistics would drift apart). ``GlobalBatchNorm2d`` sums the
per-channel count, sum and sum of squares over the ranks with a differentiable
all-reduce (its backward is the all-reduce of the gradients), so the statistics,
their gradients and the running statistics are those of the global batch.
``torch.nn.SyncBatchNorm`` does this on GPUs only; this one also runs on gloo (CPU).

Alone (no process group, or one rank) and in eval mode it is ``nn.BatchNorm2d``
itself, so single-process results and state-dict keys are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduce (sum) of the output's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        import torch.distributed as dist

        g = g.clone()
        dist.all_reduce(g)
        return g


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (N, C, H, W) with batch statistics over every rank's images in training."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or _world_size() == 1:
            return super().forward(x)
        C = x.shape[1]
        n_local = x.shape[0] * x.shape[2] * x.shape[3]
        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.new_full((1,), float(n_local))])
        tot = _SumOverRanks.apply(local)
        n = tot[-1]
        mean = tot[:C] / n
        var = (tot[C:2 * C] / n - mean * mean).clamp_min(0)  # biased, as batch norm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y
