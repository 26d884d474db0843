"""Per-particle pose confidence after a run, from the final volume and poses (no I/O).

For each image, with its final pose (A, t):

  1. ``loss``: the run's loss (``forward.per_image_loss``, L1 by default) at the final pose, at the
     Fourier box ``loss_crop`` (32: half Nyquist at the default working box 64, where the signal is);
  2. ``gap``: at the low Fourier box ``crop``, the L2 loss of the best pose *more than ``exclude_deg``
     away* from A minus the L2 loss at A. The far poses: a scan of the near-uniform rotation grid
     ``super_fibonacci_rotations(grid_size)`` (4608: 7.6 deg median to the nearest grid point) with
     ``stage1.grid_scores`` (shift fixed at the final shift), grid points within ``exclude_deg`` of A
     left out; the ``top`` best are re-scored and the best of them refined by a deterministic pattern
     search (``rounds`` rounds of +-step about the three image axes, the step halving from
     ``step_deg``), a move into the excluded cap refused, so the refined pose stays far;
  3. ``noise``: the noise unit of the gap, the standard deviation of the L2 loss under Gaussian noise:
     for K independent Hartley coefficients (the transform is orthogonal: white noise stays white) with
     residual variance sigma^2, the mean of r^2 has std sigma^2 sqrt(2 / K) = loss sqrt(2 / K);
  4. ``confidence = 1 - exp(-max(gap, 0) / (scale * noise))``, in [0, 1].

Why this mapping: a pure-noise image has no preferred pose, so its best pose and its best far pose
differ by chance alone; measured (box 32 and 64, junk at the best pose a search finds), 90% of such
images have a gap under 0.5 noise units, while images of the map at SNR 0.1-0.3 have a median gap of
1.35-1.8 units. The confidence is then ~0 when a pose 15+ degrees away fits as well (the pose is not
determined: junk, or a view the map cannot tell apart) and tends to 1 as the final pose beats every far
pose by many noise units; it is monotonic in the gap in noise units, so one cut-off means the same for
images of different noise and CTF. (The logistic of the Gaussian log-likelihood ratio, K gap / (2
sigma^2), the two-pose posterior, would saturate at 1 for almost every image at these sizes: RELION's
rlnMaxValueProbDistribution has that problem.) The gap is in L2 whatever the run's loss: the scan is
L2, and L2 is the loss with a known noise law. The low ``crop`` (16) is where the pose information of
an ab-initio map is, and it keeps the scan cheap.

Cost per image: the scan is two matrix products of the chunk's (B, K) images with the (G, K) grid
slices (made once per chunk), then 1 + top + 6 rounds renders at ``crop`` and one at ``loss_crop``.
Measured on 1 thread (box 64, 2 cores shared, CPU time): ~0.8-1.0 s per 1000 images. Memory is
bounded by ``chunk`` images at a time (chunk x grid_size scores: 19 MB at the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cryospin_relion.engine.forward import recrop
from cryospin_relion.engine.particles import ParticleImages
from cryospin_relion.engine.stage1 import candidate_losses, grid_scores
from cryospin_relion.geometry.rotations import so3_exp, super_fibonacci_rotations


@dataclass(frozen=True)
class ScoreSettings:
    """How the scores are computed (see the module docstring)."""

    exclude_deg: float = 15.0  # far = more than this from the final pose
    grid_size: int = 4608  # near-uniform rotations of the scan (median 7.6 deg to the nearest)
    crop: int = 16  # Fourier box of the scan, the refinement and the gap (capped at the working box)
    loss_crop: int = 32  # Fourier box of the reported loss (capped at the working box)
    top: int = 3  # best far grid rotations re-scored; the best of them is refined
    rounds: int = 2  # pattern-search rounds
    step_deg: float = 4.0  # first round's step (about half the grid spacing)
    scale: float = 1.0  # noise units per e-fold of (1 - confidence)
    chunk: int = 1024  # images at a time (the scan's scores are chunk x grid_size floats)


@dataclass
class PoseScores:
    """Per-particle scores, (N,) float32 tensors on the CPU, in the table's row order."""

    confidence: Tensor  # in [0, 1], larger = better determined pose
    loss: Tensor  # the run's loss at the final pose, at loss_crop (smaller = better fit)
    gap: Tensor  # best far L2 loss - final L2 loss, at crop (< 0 when a far pose fits better)
    noise: Tensor  # the noise unit of the gap (> 0)


def loss_noise(loss: Tensor, n_coeff: int) -> Tensor:
    """Standard deviation of a per-image L2 loss (the mean of r^2 over ``n_coeff`` independent Gaussian
    coefficients) whose value is ``loss``: loss sqrt(2 / K)."""
    return loss * math.sqrt(2.0 / n_coeff)


def confidence_from_gap(gap: Tensor, noise: Tensor, scale: float) -> Tensor:
    """1 - exp(-max(gap, 0) / (scale * noise)), in [0, 1]."""
    return 1.0 - torch.exp(-gap.clamp_min(0) / (scale * noise.clamp_min(1e-30)))


def _cos_angle(R: Tensor, G: Tensor) -> Tensor:
    """(tr(R_b^T G_g) - 1) / 2 = cos(angle between R_b and G_g): (B, 3, 3) x (..., 3, 3) -> (B, ...)."""
    if G.ndim == 3:
        tr = torch.einsum("bij,gij->bg", R, G)
    else:
        tr = torch.einsum("bij,bkij->bk", R, G)
    return (tr - 1.0) / 2.0


def _pattern(step_rad: float, device) -> Tensor:
    """(6, 3, 3) rotations of +-step about x, y and z (left-multiplied: image-frame axes)."""
    w = torch.cat([torch.eye(3), -torch.eye(3)]) * step_rad
    return so3_exp(w.to(device, non_blocking=True))


@torch.no_grad()
def score_batch(volume, batch, R: Tensor, t: Tensor, grid_rot: Tensor, s: ScoreSettings, loss_kind: str = "l1",
                grid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, gap, noise), each (B,), of one batch (prepared at a Fourier box >= the settings' crops).

    Args:
        R: (B, 3, 3) final RELION A; t: (B, 2) final content translations, working-box px.
        grid_rot: (G, 3, 3) the scan's rotations (same device).
    """
    grid = volume.grid().detach() if grid is None else grid
    B = R.shape[0]
    R1, t1 = R[:, None], t[:, None]
    loss = candidate_losses(volume, recrop(batch, min(s.loss_crop, batch.crop)), R1, t1, loss_kind, grid)[:, 0]
    gb = recrop(batch, min(s.crop, batch.crop))
    l0 = candidate_losses(volume, gb, R1, t1, "l2", grid)[:, 0]
    # the scan's L2 scores lack the per-image constant ||y||^2: only their order is used
    cos_ex = math.cos(math.radians(s.exclude_deg))
    sc = grid_scores(volume, gb, grid_rot, t, grid)[:, 0]  # (B, G)
    sc = sc.masked_fill(_cos_angle(R, grid_rot) > cos_ex, float("inf"))
    kk = sc.topk(min(s.top, len(grid_rot)), dim=1, largest=False).indices  # (B, k)
    pc = candidate_losses(volume, gb, grid_rot[kk], t1.expand(B, kk.shape[1], 2), "l2", grid)  # (B, k)
    ar = torch.arange(B, device=R.device)
    j = pc.argmin(1)
    Rb, lb = grid_rot[kk[ar, j]], pc[ar, j]  # the best far candidate, refined below
    for r in range(s.rounds):
        P = _pattern(math.radians(s.step_deg) / 2**r, R.device)  # (6, 3, 3)
        Rl = P[None] @ Rb[:, None]  # (B, 6, 3, 3)
        pl = candidate_losses(volume, gb, Rl, t1.expand(B, 6, 2), "l2", grid)
        pl = pl.masked_fill(_cos_angle(R, Rl) > cos_ex, float("inf"))  # never into the excluded cap
        best, j = pl.min(1)
        better = best < lb
        Rb = torch.where(better[:, None, None], Rl[ar, j], Rb)
        lb = torch.where(better, best, lb)
    return loss, lb - l0, loss_noise(l0, gb.target.shape[-1])


@torch.no_grad()
def score_particles(volume, data: ParticleImages, R: Tensor, t: Tensor, settings: ScoreSettings | None = None,
                    loss_kind: str = "l1", mask_radius: float = 1.0,
                    on_chunk: Callable[[int, int], None] | None = None, rows: Tensor | None = None) -> PoseScores:
    """Scores of every particle of ``data`` at its final pose (R (N, 3, 3) RELION A, t (N, 2) working-box px,
    any device/dtype), ``settings.chunk`` images at a time; ``on_chunk(done, total)`` after each chunk.
    ``rows`` (increasing indices): score only these (a data-parallel rank's share); the other rows are 0."""
    s = settings or ScoreSettings()
    dev = data.device
    grid = volume.grid().detach()
    G = super_fibonacci_rotations(s.grid_size, dtype=torch.float32).to(dev)
    R = torch.as_tensor(R).to(dev, torch.float32)
    t = torch.as_tensor(t).to(dev, torch.float32)
    if R.shape != (data.N, 3, 3) or t.shape != (data.N, 2):
        raise ValueError(f"poses {tuple(R.shape)}, {tuple(t.shape)} do not match {data.N} images")
    out = [torch.zeros(data.N, device=dev) for _ in range(3)]  # on the device until the end: no read per chunk
    todo = torch.arange(data.N) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
    for a in range(0, len(todo), s.chunk):
        idx = todo[a:a + s.chunk]
        b = data.batch(idx, min(data.box, max(s.crop, s.loss_crop)), mask_radius, None)
        res = score_batch(volume, b, R[b.idx], t[b.idx], G, s, loss_kind, grid)
        for o, v in zip(out, res):
            o[b.idx] = v.float()
        if on_chunk is not None:
            on_chunk(a + len(idx), len(todo))
    loss, gap, noise = (o.cpu() for o in out)
    return PoseScores(confidence_from_gap(gap, noise, s.scale), loss, gap, noise)
