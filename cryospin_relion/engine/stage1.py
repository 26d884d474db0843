"""Stage 1, auto-encoding: multi-head encoder + volume decoder, winner takes all.

Reference method (``explore_candidates: 0``): every head's pose renders a slice;
the per-image loss is the minimum over the M heads, and only the winning head's
pose receives gradient (the min is taken with a detached argmin and a gather, so
the other heads' outputs are not in the graph of the loss). The encoder trunk and
the volume are trained by the winners.

Exploration (the default, ``explore_candidates > 0``): the winner-takes-all
candidate set of each image is enlarged with poses that do not come from the
encoder (built by the engine, ``engine.run``):

  - the image's remembered best pose (the overall winner of its previous visit),
  - a few local perturbations of it (random axis-angle rotations, shift jitter),
  - K global candidates: uniformly random rotations with the remembered shift.

All candidates are scored with the same ``render`` / ``per_image_loss`` as the
heads (the extra ones without gradient: they are detached constants). Then

  - the volume is trained by the overall winner of each image (min over heads and
    extra candidates: winner takes all over the whole set);
  - the encoder keeps its winner-takes-all loss over its own heads, and, where the
    overall winner is not a head, the head nearest to the winner (chordal distance
    ||R_head - R_best||_F) is pulled toward it by a distillation term
    ``distill_weight * (||R_head - R_best||_F^2 + ||t_head - t_best||^2 / max_shift^2)``;
    for those images the head loss does not train the volume (the volume sees
    only the winner).

Why: with a randomly initialised encoder and a few thousand optimisation steps
(a CPU run), the heads alone do not find the right pose basin -- they collapse
onto a few poses and the volume converges to a blurred, wrong map (measured:
median rotation error ~100 deg at box 32, even with the true volume fixed). The
exploration candidates are a cheap stochastic global search (like the random
pose sampling of SGD-based ab-initio methods); the distillation lets the encoder
amortise that search, which is what keeps the amortized stage useful on short
runs. Measured at box 32 (2,000 particles, SNR 0.3, CTF, shifts; defaults, end of
stage 1): remembered poses 9.7 deg median error; the encoder head nearest to them
35.6 deg with distillation, 81.5 deg without (distill_weight 0). On such short
runs the search still wins almost every image (heads < 1%); the heads' poses are
also seeds of the search, so a better encoder starts the search closer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cryospin_relion.config import SearchConfig
from cryospin_relion.engine.forward import Batch, per_image_loss, recrop, render
from cryospin_relion.geometry.rotations import random_rotations, so3_exp
from cryospin_relion.geometry.shifts import hartley_shift_at


@dataclass
class SearchResult:
    """The best pose of each image of a batch found by ``search_poses``."""

    rot: Tensor  # (B, 3, 3) RELION A
    shift: Tensor  # (B, 2) working-box px
    loss: Tensor  # (B,)
    source: Tensor  # (B,) 0 = a seed other than the first, 1 = the first seed (memory), 2 = refinement, 3 = global
    basin: Tensor | None = None  # (B,) the source of the round-0 winner that refinement started from (0, 1 or 3)


@dataclass
class Stage1Result:
    """One stage-1 step: the mean loss of the overall winners (a 0-dim tensor on the device: reading it
    makes the host wait for the GPU, so the engine sums it there), the best head of each image (B,), the
    index of the overall winner in heads + extra candidates (B,) (M + e for extra candidate e), and the
    overall winning pose (detached)."""

    loss: Tensor
    win: Tensor
    overall: Tensor
    rot: Tensor
    shift: Tensor


def multihead_losses(encoder, volume, batch: Batch, loss_kind: str = "l1", grid: Tensor | None = None):
    """Per-image, per-head losses (B, M) and the candidate poses."""
    rot, shift = encoder(batch.images)  # (B, M, 3, 3), (B, M, 2)
    per = candidate_losses(volume, batch, rot, shift, loss_kind, grid)
    return per, rot, shift


def candidate_losses(volume, batch: Batch, rot: Tensor, shift: Tensor, loss_kind: str = "l1",
                     grid: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Losses (B', C) of candidate poses rot (B', C, 3, 3), shift (B', C, 2) against the batch's images
    (``rows`` selects the images, default all)."""
    B, C = rot.shape[:2]
    sl = volume.slices(rot.reshape(B * C, 3, 3), grid=grid, freqs=batch.mask.freqs)  # (B * C, P)
    ctf = batch.ctf if rows is None or batch.ctf is None else batch.ctf[rows]
    target = batch.target if rows is None else batch.target[rows]
    ctf = None if ctf is None else ctf.repeat_interleave(C, 0)
    model = render(sl, ctf, shift.reshape(B * C, 2), batch.mask).reshape(B, C, -1)
    return per_image_loss(model, target[:, None], loss_kind)  # (B, C)


def best_candidate(volume, batch: Batch, rot: Tensor, shift: Tensor, loss_kind: str = "l1"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The lowest-loss of each image's C candidate poses rot (B, C, 3, 3) / shift (B, C, 2): (rotations (B, 3, 3),
    shifts (B, 2), losses (B,))."""
    per = candidate_losses(volume, batch, rot, shift, loss_kind)
    j = per.argmin(1)
    ar = torch.arange(len(j), device=j.device)
    return rot[ar, j], shift[ar, j], per[ar, j]


@dataclass
class ScanSlices:
    """A volume's central sections at the global scan's rotations, inside the scan's mask: the scan's costliest
    part, made once and reusable for several batches (with K classes each class renews its own only every K-th
    batch, engine/run.py: the scan only ranks candidates, and its top ones are re-scored on the live volume)."""

    rot: Tensor  # (G, 3, 3) the grid turned by one random rotation
    slices: Tensor  # (G, P) the sections at Fourier box ``crop``, the P frequencies of its mask
    crop: int


@torch.no_grad()
def scan_slices(volume, grid_rot: Tensor, batch: Batch, grid: Tensor | None = None) -> ScanSlices:
    """``ScanSlices`` of ``volume`` at rotations ``grid_rot`` (G, 3, 3), at ``batch``'s Fourier box and mask."""
    S = volume.slices(grid_rot, grid=grid, freqs=batch.mask.freqs)
    return ScanSlices(grid_rot, S, batch.crop)


@torch.no_grad()
def grid_scores(volume, batch: Batch, grid_rot: Tensor, shift: Tensor, grid: Tensor | None = None,
                scan: ScanSlices | None = None) -> Tensor:
    """L2 losses (B, T, G) of every image against every rotation of ``grid_rot`` (G, 3, 3), each image at
    each of its T shifts ``shift`` (B, T, 2) (or (B, 2): T = 1), up to a per-image constant.
    ``scan``: the sections already made (``scan_slices``; then ``grid_rot`` is ``scan.rot``).

    The Hartley shift is orthogonal on the (radially symmetric) mask, so ||shift_t(c S_r) - y||^2 =
    ||c S_r - shift_-t(y)||^2 and the scores are two matrix products of the G slices with the B * T
    shifted images: sum_k c_i^2 S_r^2 - 2 sum_k c_i S_r y'_it (cheap enough to scan thousands of rotations
    times a few dozen shifts per image)."""
    if shift.ndim == 2:
        shift = shift[:, None]
    B, T = shift.shape[:2]
    S = (scan if scan is not None else scan_slices(volume, grid_rot, batch, grid)).slices  # (G, P)
    y = hartley_shift_at(batch.target.repeat_interleave(T, 0), -shift.reshape(B * T, 2), batch.mask.freqs,
                         batch.mask.negated).reshape(B, T, -1)  # (B, T, P)
    if batch.ctf is None:
        return (S * S).sum(1)[None, None, :] - 2 * y @ S.T
    c = batch.ctf  # (B, P)
    return ((c * c) @ (S * S).T)[:, None, :] - 2 * (c[:, None] * y) @ S.T


def shift_offsets(half_range: float, step: float, device=None) -> Tensor:
    """(T, 2) offsets of a square grid of ``step`` px out to +-half_range px (x, y); (1, 2) zeros if 0."""
    if half_range <= 0 or step <= 0:
        return torch.zeros(1, 2, device=device)
    k = int(math.floor(half_range / step + 1e-6))
    v = torch.arange(-k, k + 1, dtype=torch.float32, device=device) * step
    gy, gx = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)


@torch.no_grad()
def search_poses(volume, batch: Batch, seed_rot: Tensor, seed_shift: Tensor, generator: torch.Generator,
                 grid_rot: Tensor | None, search: SearchConfig, max_shift: float, loss_kind: str = "l1",
                 chunk: int = 8192, draw_rows: Tensor | None = None, draw_batch: int | None = None,
                 scan: ScanSlices | None = None) -> SearchResult:
    """Stochastic pose search without gradient (the exploration candidate of each image of one batch).

    Global step: every rotation of ``grid_rot`` (G, 3, 3), turned by one random rotation per batch
    (``grid_rot @ Q``), is scored with ``grid_scores`` (L2) at each shift of a square grid
    (``explore_shift_step`` px, out to +-``explore_shift_range`` x box) around the image's first seed shift;
    the best shift is kept per rotation, and the ``explore_top`` best rotations per image are kept with
    their shifts. The scan is done at the Fourier box ``explore_grid_crop`` when that is smaller than the
    batch's (0 = the batch's): at low resolution a grid of ~15 degree spacing still ranks the right basin
    first, and the scan costs grid_crop^2. Round 0 scores them together with the seeds (B, S) -- the
    remembered pose first, then e.g. the heads' poses -- with the configured loss; each of
    ``explore_rounds`` refinement rounds scores ``explore_local`` perturbations of the current best,
    so3_exp(w) @ R_best with w a random rotation vector of RMS angle explore_local_deg / 2^r and the shift
    jittered by explore_shift_px / 2^r (RMS), and keeps the best. Random numbers come from ``generator``
    (on the CPU). Shifts stay within +-``max_shift`` px.

    ``draw_rows`` (B,) / ``draw_batch``: the images are rows ``draw_rows`` of a batch of ``draw_batch``
    (a data-parallel rank's share of the global batch, engine/distributed.py): the random numbers are
    drawn for the whole batch and these rows taken, so each image gets the same draws as in one process.
    ``scan``: the global scan's turned grid and its sections, already made (``scan_slices`` at the scan's
    Fourier box); then no random turn is drawn here and ``grid_rot`` only switches the scan on.
    """
    top, rounds, local_n = search.explore_top, search.explore_rounds, search.explore_local
    grid = volume.grid().detach()
    dev = seed_rot.device
    B, S = seed_rot.shape[:2]

    def score(R, t):
        C = R.shape[1]
        step = max(1, chunk // C)
        return torch.cat([candidate_losses(volume, batch, R[a:a + step], t[a:a + step], loss_kind, grid,
                                           torch.arange(a, min(B, a + step), device=dev))
                          for a in range(0, B, step)], 0)

    Rc, tc = seed_rot, seed_shift
    if grid_rot is not None and len(grid_rot) and top > 0:
        gb = scan_batch(batch, search)
        if scan is None:
            Q = random_rotations(1, generator, dtype=torch.float32)[0].to(dev, non_blocking=True)
            G = grid_rot.to(dev) @ Q
        else:
            G = scan.rot
            if scan.crop != gb.crop:
                raise ValueError(f"scan sections at Fourier box {scan.crop}, the scan works at {gb.crop}")
        offsets = shift_offsets(search.explore_shift_range * batch.box, search.explore_shift_step, dev)
        ts = (seed_shift[:, :1] + offsets[None]).clamp(-max_shift, max_shift)
        sc, jt = grid_scores(volume, gb, G, ts, grid, scan).min(1)  # (B, G): best shift per rotation
        kk = sc.topk(min(top, len(G)), dim=1, largest=False).indices
        Rc = torch.cat([seed_rot, G[kk]], 1)
        tc = torch.cat([seed_shift, torch.gather(ts, 1, jt.gather(1, kk)[..., None].expand(-1, -1, 2))], 1)
    per = score(Rc, tc)
    ar = torch.arange(B, device=dev)
    k = per.argmin(1)
    best_R, best_t, best_l = Rc[ar, k], tc[ar, k], per[ar, k]
    src = torch.where(k == 0, 1, torch.where(k < S, 0, 3))
    basin = src.clone()

    def randn(*shape: int) -> Tensor:
        if draw_rows is None:
            return torch.randn(B, *shape, generator=generator)
        return torch.randn(draw_batch, *shape, generator=generator)[draw_rows.cpu()]

    for r in range(rounds):
        if local_n <= 0:
            break
        w = randn(local_n, 3) * (math.radians(search.explore_local_deg) / 2**r / math.sqrt(3))
        Rl = so3_exp(w.to(dev, non_blocking=True)) @ best_R[:, None]
        jitter = search.explore_shift_px / 2**r / math.sqrt(2)
        tl = best_t[:, None] + randn(local_n, 2).to(dev, non_blocking=True) * jitter
        tl = tl.clamp(-max_shift, max_shift)
        pl = score(Rl, tl)
        j = pl.argmin(1)
        better = pl[ar, j] < best_l
        best_R = torch.where(better[:, None, None], Rl[ar, j], best_R)
        best_t = torch.where(better[:, None], tl[ar, j], best_t)
        best_l = torch.where(better, pl[ar, j], best_l)
        src = torch.where(better, 2, src)
    return SearchResult(best_R, best_t, best_l, src, basin)


def scan_batch(batch: Batch, search: SearchConfig) -> Batch:
    """The batch at the global scan's Fourier box (``explore_grid_crop``; 0 or larger = the batch's)."""
    return recrop(batch, search.explore_grid_crop) if search.explore_grid_crop else batch


def winner_takes_all(per: Tensor) -> tuple[Tensor, Tensor]:
    """(B, M) losses -> (mean of the per-image minima, winning head (B,)); gradient only to winners."""
    win = per.detach().argmin(1)
    return per.gather(1, win[:, None])[:, 0].mean(), win


def nearest_head(rot: Tensor, R_best: Tensor) -> tuple[Tensor, Tensor]:
    """Chordal distances ||R_head - R_best||_F^2 (B, M) and the nearest head (B,)."""
    d = ((rot - R_best[:, None]) ** 2).sum((-1, -2))
    return d, d.detach().argmin(1)


def stage1_step(encoder, volume, opt_encoder, opt_volume, batch: Batch, loss_kind: str = "l1",
                extra_rot: Tensor | None = None, extra_shift: Tensor | None = None,
                distill_weight: float = 1.0, chunk: int = 8192, denom: int | None = None,
                reduce_grads: Callable[[], None] | None = None) -> Stage1Result:
    """One optimisation step of encoder and decoder.

    ``extra_rot`` (B, E, 3, 3) / ``extra_shift`` (B, E, 2): exploration candidates (detached; see the
    module docstring); None = the reference winner-takes-all over the heads.
    Data parallel (engine/distributed.py): the batch is this rank's share of a global batch of ``denom``
    images (the loss is divided by ``denom``), and ``reduce_grads`` sums the gradients over the ranks
    before the optimiser steps. The returned loss is the mean over this rank's images.
    """
    def step(total: Tensor) -> None:
        (total / (batch.idx.shape[0] if denom is None else denom)).backward()
        if reduce_grads is not None:
            reduce_grads()
        opt_encoder.step()
        opt_volume.step()

    encoder.train()
    opt_encoder.zero_grad(set_to_none=True)
    opt_volume.zero_grad(set_to_none=True)
    if extra_rot is None or extra_rot.shape[1] == 0:
        per, rot, shift = multihead_losses(encoder, volume, batch, loss_kind)
        loss, win = winner_takes_all(per)
        if denom is None and reduce_grads is None:
            loss.backward()  # the mean itself (bitwise as before)
            opt_encoder.step()
            opt_volume.step()
        else:
            step(loss * per.shape[0])
        ar = torch.arange(win.shape[0], device=win.device)
        return Stage1Result(loss.detach(), win, win, rot.detach()[ar, win], shift.detach()[ar, win])

    grid = volume.grid()
    per_h, rot, shift = multihead_losses(encoder, volume, batch, loss_kind, grid)  # (B, M)
    wt = winner_terms(volume, batch, per_h, rot, shift, extra_rot, extra_shift, loss_kind, distill_weight,
                      max(float(encoder.max_shift), 1.0), grid, chunk)
    step(wt.terms.sum())
    return Stage1Result(wt.loss.mean(), wt.win, wt.overall, wt.rot, wt.shift)


@dataclass
class WinnerTerms:
    """Per image of a batch: its stage-1 training loss ``terms`` (differentiable; see the module docstring:
    the head WTA loss where a head wins, else the volume's loss at the winning extra pose + the heads' WTA
    loss with the volume held fixed + the distillation pull), the overall winner's loss (detached), the best
    head, the overall winner's index in heads + extra candidates, and its pose."""

    terms: Tensor  # (B,)
    loss: Tensor  # (B,)
    win: Tensor  # (B,)
    overall: Tensor  # (B,)
    rot: Tensor  # (B, 3, 3)
    shift: Tensor  # (B, 2)


def winner_terms(volume, batch: Batch, per_h: Tensor, rot: Tensor, shift: Tensor, extra_rot: Tensor,
                 extra_shift: Tensor, loss_kind: str, distill_weight: float, shift_scale: float, grid: Tensor,
                 chunk: int = 8192) -> WinnerTerms:
    """Winner takes all over the heads (losses ``per_h`` (B, M) of head poses rot (B, M, 3, 3) / shift
    (B, M, 2), with gradient) and the extra candidates ``extra_rot`` (B, E, 3, 3) / ``extra_shift`` (B, E, 2)
    (constants), against ``volume`` whose live grid is ``grid``; ``shift_scale``: the distillation's shift
    unit (px)."""
    gd = grid.detach()
    B, M = per_h.shape
    E = extra_rot.shape[1]
    with torch.no_grad():
        per_x = torch.cat([candidate_losses(volume, batch, extra_rot[a:a + chunk // E], extra_shift[a:a + chunk // E],
                                            loss_kind, gd, torch.arange(a, min(B, a + chunk // E)))
                           for a in range(0, B, max(1, chunk // E))], 0)  # (B, E)
    ar = torch.arange(B, device=per_h.device)
    win_h = per_h.detach().argmin(1)
    loss_h = per_h[ar, win_h]  # (B,) head WTA (gradient to the encoder and, for head-won images, the volume)
    best_x = per_x.argmin(1)
    head_won = loss_h.detach() <= per_x[ar, best_x]
    overall = torch.where(head_won, win_h, M + best_x)
    R_win = torch.where(head_won[:, None, None], rot.detach()[ar, win_h], extra_rot[ar, best_x])
    t_win = torch.where(head_won[:, None], shift.detach()[ar, win_h], extra_shift[ar, best_x])
    # Where an extra candidate won: the volume is trained at the winning extra pose (a constant) ...
    per_b = candidate_losses(volume, batch, R_win[:, None], t_win[:, None], loss_kind, grid)[:, 0]
    # ... the encoder by its own WTA loss with the volume held fixed, plus the distillation pull.
    # Computed for every image and selected by torch.where (no gradient reaches the unselected side): picking
    # the rows first would size tensors by data, which makes CUDA wait for the host every batch; and the heads
    # win few images, so this costs little more.
    per_he = candidate_losses(volume, batch, rot, shift, loss_kind, gd)
    d_rot, j = nearest_head(rot, R_win)
    d_t = ((shift[ar, j] - t_win) ** 2).sum(-1) / shift_scale**2
    extra = per_b + per_he[ar, per_he.detach().argmin(1)] + distill_weight * (d_rot[ar, j] + d_t)
    terms = torch.where(head_won, loss_h, extra)
    loss = torch.minimum(loss_h.detach(), per_x[ar, best_x])
    return WinnerTerms(terms, loss, win_h, overall, R_win, t_win)


# -- first poses of images stage 1 did not train on (engine.run ``_assign_unvisited``) --------------------------

# where an image's first pose came from: indices into engine/history.py WINNER_SOURCES
HEADS, MEMORY, LOCAL, GLOBAL = 0, 1, 2, 3
FIRST_POSE_REFERENCE = 512  # stage-1 subset images whose median fit is the rule's reference


@dataclass
class FirstPoseResult:
    """The first pose of each image of a batch (``first_poses``)."""

    rot: Tensor  # (B, 3, 3) RELION A
    shift: Tensor  # (B, 2) working-box px
    source: Tensor  # (B,) HEADS (a head as it is), LOCAL (refined around a head), MEMORY, GLOBAL (the scan's basin)
    scanned: Tensor  # (B,) bool: sent to the global scan
    loss: Tensor  # (B,) the pose's loss


def fit_to_data(loss: Tensor, batch: Batch, loss_kind: str = "l1") -> Tensor:
    """Per-image fit (B,) = 1 - loss / (the loss of the same image against an empty model): the share of the
    image's loss that the pose explains, comparable between images of different noise, defocus and content."""
    empty = per_image_loss(torch.zeros_like(batch.target), batch.target, loss_kind)
    return 1 - loss / empty.clamp_min(1e-12)


@torch.no_grad()
def pose_fit(volume, batch: Batch, rot: Tensor, shift: Tensor, loss_kind: str = "l1") -> Tensor:
    """``fit_to_data`` (B,) of the poses rot (B, 3, 3), shift (B, 2) of a batch's images."""
    return fit_to_data(candidate_losses(volume, batch, rot[:, None], shift[:, None], loss_kind)[:, 0], batch,
                       loss_kind)


def batch_rows(batch: Batch, rows: Tensor) -> Batch:
    """The images ``rows`` of a batch."""
    return Batch(batch.idx[rows], batch.images[rows], batch.target[rows],
                 None if batch.ctf is None else batch.ctf[rows], batch.mask, None if batch.cls is None else batch.cls[rows])


def search_sources(res: SearchResult) -> Tensor:
    """Where each winner of ``search_poses`` seeded by (memory, heads...) came from: the memory's or the
    scan's basin (refined or not), a head (HEADS) or refinement around one (LOCAL)."""
    head = torch.where(res.source == 2, LOCAL, HEADS)
    return torch.where(res.basin == 1, MEMORY, torch.where(res.basin == 3, GLOBAL, head))


@torch.no_grad()
def first_poses(volume, batch: Batch, head_rot: Tensor, head_shift: Tensor, generator: torch.Generator,
                grid_rot: Tensor, search: SearchConfig, max_shift: float, scan_below: float, loss_kind: str = "l1",
                draw_rows: Tensor | None = None, draw_batch: int | None = None,
                scan: ScanSlices | None = None) -> FirstPoseResult:
    """Amortised first poses: the encoder's M head poses ``head_rot`` (B, M, 3, 3) / ``head_shift`` (B, M, 2)
    refined locally (``search_poses`` without the grid: its refinement rounds), then the global scan
    (``search_poses`` with ``grid_rot``, seeded by that pose and the heads, so it can only improve on it) for
    the images whose head-local ``fit_to_data`` is below ``scan_below`` (none when it is <= 0).

    Why a fit threshold: on images stage 1 never saw, the heads sometimes propose a wrong basin, and a pose in
    a wrong basin explains less of its image (bench/amortize.py --measure-rule; the figures and the choice of
    the threshold are in config.SearchConfig ``first_pose_scan_below``). ``draw_rows`` / ``draw_batch`` /
    ``scan``: as in ``search_poses`` (a data-parallel rank's share of the global batch; the scan's sections)."""
    B = head_rot.shape[0]
    hl = search_poses(volume, batch, head_rot, head_shift, generator, None, search, max_shift, loss_kind,
                      draw_rows=draw_rows, draw_batch=draw_batch)
    rot, shift, source, loss = hl.rot, hl.shift, torch.where(hl.source == 2, LOCAL, HEADS), hl.loss
    scanned = fit_to_data(hl.loss, batch, loss_kind) < scan_below
    if scan_below <= 0:  # 0 = never (a fit can be negative)
        scanned = torch.zeros_like(scanned)
    sel = scanned.nonzero()[:, 0]
    if len(sel):
        pos = torch.arange(B, device=sel.device) if draw_rows is None else draw_rows.to(sel.device)
        seeds_R = torch.cat([rot[sel, None], head_rot[sel]], 1)
        seeds_t = torch.cat([shift[sel, None], head_shift[sel]], 1)
        fb = search_poses(volume, batch_rows(batch, sel), seeds_R, seeds_t, generator, grid_rot, search, max_shift,
                          loss_kind, draw_rows=pos[sel], draw_batch=B if draw_batch is None else draw_batch, scan=scan)
        # the first seed is the head-local pose: kept (with its source) unless the scan's basin wins
        src = torch.where(fb.basin == 3, GLOBAL, torch.where(fb.source == 2, LOCAL, source[sel]))
        rot, shift, source, loss = rot.clone(), shift.clone(), source.clone(), loss.clone()
        rot[sel], shift[sel], source[sel], loss[sel] = fb.rot, fb.shift, src, fb.loss
    return FirstPoseResult(rot, shift, source, scanned, loss)
