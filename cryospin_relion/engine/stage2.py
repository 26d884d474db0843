"""Stage 2, auto-decoding: per-particle poses optimised directly, alternating with the volume.

For each batch: ``pose_iters`` steps on the batch's poses (volume fixed; per-row
Adam in ``model.pose_table``), then ``vol_iters`` steps on the volume (poses fixed).
"""

from __future__ import annotations

import torch

from cryospin_relion.engine.losses import Batch, per_image_loss, render


def pose_loss(volume_grid, volume, table, batch: Batch, delta=None, dshift=None, loss_kind="l1", threads=None):
    """Per-image losses (B,) at the table's poses (optionally perturbed)."""
    R, t = table.poses(batch.idx, delta, dshift)
    sl = volume.slices(R, crop=batch.crop, grid=volume_grid, threads=threads)
    model = render(sl, batch.ctf, t, batch.box)
    return per_image_loss(model, batch.target, batch.mask, loss_kind)


def stage2_step(volume, table, opt_volume, batch: Batch, pose_iters: int = 5, vol_iters: int = 1,
                loss_kind: str = "l1", threads: int | None = None) -> dict:
    """Alternate pose and volume steps on one batch; returns the last volume-step loss."""
    with torch.no_grad():
        grid = volume.grid()
    first = None
    for _ in range(pose_iters):
        delta, dshift = table.perturbation(batch.idx)
        per = pose_loss(grid, volume, table, batch, delta, dshift, loss_kind, threads)
        if first is None:
            first = float(per.detach().mean())
        # sum over images: each row's gradient is its own image's loss gradient
        gd, gs = torch.autograd.grad(per.sum(), (delta, dshift))
        table.step(batch.idx, gd, gs)
    loss = first
    for _ in range(vol_iters):
        opt_volume.zero_grad(set_to_none=True)
        per = pose_loss(None, volume, table, batch, loss_kind=loss_kind, threads=threads)
        l = per.mean()
        l.backward()
        opt_volume.step()
        loss = float(l.detach())
    if loss is None:
        with torch.no_grad():
            loss = float(pose_loss(grid, volume, table, batch, loss_kind=loss_kind, threads=threads).mean())
    return {"loss": loss, "loss_before_pose": first}
