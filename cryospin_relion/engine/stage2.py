"""Stage 2, auto-decoding: per-particle poses optimised directly, alternating with the volume.

For each batch: ``pose_iters`` steps on the batch's poses (volume fixed; per-row
Adam in ``model.pose_table``), then ``vol_iters`` steps on the volume (poses fixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cryospin_relion.engine.forward import Batch, per_image_loss, render


@dataclass
class Stage2Result:
    """One stage-2 batch: the loss of the last volume step (after the pose steps), and the loss before them;
    0-dim tensors on the device (reading one makes the host wait for the GPU: the engine sums them there)."""

    loss: Tensor
    loss_before_pose: Tensor | None


def pose_loss(volume_grid, volume, table, batch: Batch, delta=None, dshift=None, loss_kind="l1"):
    """Per-image losses (B,) at the table's poses (optionally perturbed)."""
    R, t = table.poses(batch.idx, delta, dshift)
    if batch.cls is None:
        sl = volume.slices(R, grid=volume_grid, freqs=batch.mask.freqs)
    else:  # K class volumes (model/class_volumes.py): each image's slice from its class
        sl = volume.slices(R, grid=volume_grid, cls=batch.cls, freqs=batch.mask.freqs)
    model = render(sl, batch.ctf, t, batch.mask)
    return per_image_loss(model, batch.target, loss_kind)


def stage2_step(volume, table, opt_volume, batch: Batch, pose_iters: int = 5, vol_iters: int = 1,
                loss_kind: str = "l1", denom: int | None = None,
                reduce_grads: Callable[[], None] | None = None) -> Stage2Result:
    """Alternate pose and volume steps on one batch.

    Data parallel (engine/distributed.py): the batch is this rank's share of a global batch of ``denom``
    images, and ``reduce_grads`` sums the volume's gradients over the ranks before each volume step (the
    pose steps are per row, so they need nothing). The losses returned are this rank's means."""
    with torch.no_grad():
        grid = volume.grid()
    first = None
    for _ in range(pose_iters):
        delta, dshift = table.perturbation(batch.idx)
        per = pose_loss(grid, volume, table, batch, delta, dshift, loss_kind)
        if first is None:
            first = per.detach().mean()
        # sum over images: each row's gradient is its own image's loss gradient
        gd, gs = torch.autograd.grad(per.sum(), (delta, dshift))
        table.step(batch.idx, gd, gs)
    loss = first
    for _ in range(vol_iters):
        opt_volume.zero_grad(set_to_none=True)
        per = pose_loss(None, volume, table, batch, loss_kind=loss_kind)
        l = per.mean()
        (l if denom is None else per.sum() / denom).backward()
        if reduce_grads is not None:
            reduce_grads()
        opt_volume.step()
        loss = l.detach()
    if loss is None:
        with torch.no_grad():
            loss = pose_loss(grid, volume, table, batch, loss_kind=loss_kind).mean()
    return Stage2Result(loss, first)
