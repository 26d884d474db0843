"""Stage 1, auto-encoding: multi-head encoder + volume decoder, winner takes all.

Every head's pose renders a slice; the per-image loss is the minimum over the M
heads, and only the winning head's pose receives gradient (the min is taken with
a detached argmin and a gather, so the other heads' outputs are not in the graph
of the loss). The encoder trunk and the volume are trained by the winners.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_relion.engine.losses import Batch, per_image_loss, render


def multihead_losses(encoder, volume, batch: Batch, loss_kind: str = "l1", threads: int | None = None):
    """Per-image, per-head losses (B, M) and the candidate poses."""
    rot, shift = encoder(batch.images)  # (B, M, 3, 3), (B, M, 2)
    B, M = rot.shape[:2]
    sl = volume.slices(rot.reshape(B * M, 3, 3), crop=batch.crop, threads=threads)
    ctf = None if batch.ctf is None else batch.ctf.repeat_interleave(M, 0)
    model = render(sl, ctf, shift.reshape(B * M, 2), batch.box).reshape(B, M, batch.crop, batch.crop)
    per = per_image_loss(model, batch.target[:, None], batch.mask, loss_kind)  # (B, M)
    return per, rot, shift


def winner_takes_all(per: Tensor) -> tuple[Tensor, Tensor]:
    """(B, M) losses -> (mean of the per-image minima, winning head (B,)); gradient only to winners."""
    win = per.detach().argmin(1)
    return per.gather(1, win[:, None])[:, 0].mean(), win


def stage1_step(encoder, volume, opt_encoder, opt_volume, batch: Batch, loss_kind: str = "l1",
                threads: int | None = None) -> dict:
    """One optimisation step of encoder and decoder; returns loss, winners and winning poses (detached)."""
    encoder.train()
    opt_encoder.zero_grad(set_to_none=True)
    opt_volume.zero_grad(set_to_none=True)
    per, rot, shift = multihead_losses(encoder, volume, batch, loss_kind, threads)
    loss, win = winner_takes_all(per)
    loss.backward()
    opt_encoder.step()
    opt_volume.step()
    ar = torch.arange(win.shape[0], device=win.device)
    return {
        "loss": float(loss.detach()),
        "win": win,
        "rot": rot.detach()[ar, win],
        "shift": shift.detach()[ar, win],
    }
