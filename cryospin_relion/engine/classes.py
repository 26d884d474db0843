"""K classes (``abinit --classes K``): class assignment, its annealing, re-seeding, and the stage-1 step.

Every particle belongs to the class whose best pose gives the lowest loss
(winner takes all over heads, search and classes). Each class has its own
volume (model/class_volumes.py), its own M encoder heads (heads k*M .. k*M+M-1
of one encoder with K*M heads: the trunk is shared, a class's poses live in
its own frame), and its own pose memory.

Why annealing: early in stage 1 the first class to take shape fits every image a
little better than the empty ones, and with hard assignments it keeps them all.
As with cryoSPARC's class similarity, each image's stage-1 gradient is first
spread over the classes: class weights ``w_k = s / K + (1 - s) [k = best]``,
with the similarity ``s`` falling linearly from ``class_similarity`` to 0 over
``class_anneal_epochs`` epochs (hard assignments after that). With ``s = 1``
every class learns from every image (at its own poses); as ``s`` falls, each
class learns more from the images it explains best.

Re-seeding: after a stage-1 epoch a class that holds less than ``class_min_share``
of its even share is re-seeded by splitting the largest class
(``ClassVolumes.split``: a copy at half amplitude, which the images that fit
the largest class worst, junk first, then prefer), with that class's pose memory.

Duplicates: with more classes than structures, one structure can form in two
classes (each in its own frame and hand), which then split its particles by noise
and give two maps each worse than one. Every image has a pose in every class (each
class's pose memory), so two classes hold the same structure exactly when their
poses of the same images differ by one fixed rotation (``A_j = A_i R^T``; with a
mirror, ``A_j = M A_i M R^T``): ``relation_spread_deg``. Measured at the end of the
RELION-projected junk set's K = 3 run: two classes of the same structure 5 degrees,
distinct structures and junk 60-160 degrees. After the annealing, the smaller
class of such a pair is emptied (``ClassVolumes.clear``; its particles join the
larger), and is free to take junk or another structure; re-seeding belongs to the
annealing epochs, or it would make the duplicate again.

Stage 2 refines each particle's pose in its class (``Batch.cls``); after each
stage-2 epoch a particle moves to another class when its remembered pose there
fits better than its refined pose in its own (``engine.run`` ``_move_classes``).

No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cryospin_relion.config import ScheduleConfig
from cryospin_relion.engine.forward import Batch
from cryospin_relion.engine.schedule import trial_epochs
from cryospin_relion.engine.stage1 import SearchResult, WinnerTerms, batch_rows, candidate_losses, winner_terms
from cryospin_relion.geometry.hand import flip_poses_hand
from cryospin_relion.geometry.rotations import geodesic_distance_deg, project_to_so3


def similarity_at(cfg: ScheduleConfig, epoch: int) -> float:
    """The class similarity of stage-1 epoch ``epoch`` (0-based): ``class_similarity`` x (1 - epoch / E),
    E = ``class_anneal_epochs``, and 0 from epoch E on (hard assignments)."""
    E = cfg.class_anneal_epochs
    if E <= 0 or epoch >= E:
        return 0.0
    return cfg.class_similarity * (1.0 - epoch / E)


def reform_epoch(cfg: ScheduleConfig) -> int | None:
    """The stage-1 epoch (1-based) after which every class is formed again alone (``class_reform_epochs``; None =
    never): the end of the annealing (hard assignments from then on), and after the stage-1 starts."""
    if cfg.class_reform_epochs <= 0:
        return None
    starts = trial_epochs(cfg) if cfg.stage1_trials > 1 else 0
    return max(cfg.class_anneal_epochs, starts + 1, 1)


def class_weights(losses: Tensor, similarity: float) -> Tensor:
    """(B, K) losses of each image's best pose in each class -> (B, K) weights of its gradient per class:
    s / K to every class plus 1 - s to the best (rows sum to 1; ties go to the lower class)."""
    K = losses.shape[1]
    hard = torch.nn.functional.one_hot(losses.argmin(1), K).to(losses.dtype)
    return similarity / K + (1.0 - similarity) * hard


def reseed_plan(sizes: list[int], min_count: float) -> list[tuple[int, int]]:
    """(empty class, class to split) pairs for the classes with fewer than ``min_count`` members, smallest
    first; each split takes the largest class at that point (whose members are then counted as halved)."""
    sizes = list(sizes)
    plan = []
    for dst in sorted(range(len(sizes)), key=lambda k: (sizes[k], k)):
        if sizes[dst] >= min_count:
            break
        src = max(range(len(sizes)), key=lambda k: (sizes[k], -k))
        if src == dst or sizes[src] < 2 * min_count:  # nothing worth splitting
            break
        plan.append((dst, src))
        sizes[dst] = sizes[src] // 2
        sizes[src] -= sizes[dst]
    return plan


def relation_spread_deg(rot_a: Tensor, rot_b: Tensor) -> tuple[float, float]:
    """How far two sets of poses of the same images, rot_a / rot_b (n, 3, 3) RELION A, are from differing by
    one fixed rotation: the median angle (degrees) between each D = A_a^T A_b and their mean rotation (the
    projection of the mean of D onto SO(3)), for the same hand and with A_a mirrored (M A_a M).

    Two maps of one structure (V_b = V_a rotated by R about the centre, possibly mirrored) give D = R^T for
    every image, up to the pose errors; unrelated maps give D spread over SO(3) (median ~ 120 degrees)."""
    out = []
    for a in (rot_a.double(), flip_poses_hand(rot_a.double())):
        D = a.transpose(-1, -2) @ rot_b.double()
        R = project_to_so3(D.mean(0))
        out.append(float(geodesic_distance_deg(R.expand_as(D), D).median()))
    return out[0], out[1]


def duplicate_classes(rots: list[Tensor], classes: Tensor, max_spread_deg: float, min_members: int = 10
                      ) -> list[tuple[int, int, float]]:
    """Pairs (emptied class, kept class, spread in degrees) of classes that hold one structure.

    ``rots``: each class's poses of the images (K tensors (n, 3, 3)); ``classes``: (n,) each image's class.
    Two classes are one structure when the members of each, posed in both, give ``relation_spread_deg``
    below ``max_spread_deg`` with the same hand for both member sets; of such a pair the smaller is
    emptied (ties: the higher class). A class takes part in one pair per call; closest pairs first.
    Classes with fewer than ``min_members`` images are left alone (their spread means little)."""
    K = len(rots)
    sizes = torch.bincount(classes, minlength=K).tolist()
    found = []
    for i in range(K):
        for j in range(i + 1, K):
            if min(sizes[i], sizes[j]) < min_members:
                continue
            si = relation_spread_deg(rots[i][classes == i], rots[j][classes == i])
            sj = relation_spread_deg(rots[i][classes == j], rots[j][classes == j])
            spread = min(max(si[0], sj[0]), max(si[1], sj[1]))
            if spread < max_spread_deg:
                keep, drop = (i, j) if sizes[i] >= sizes[j] else (j, i)
                found.append((spread, drop, keep))
    pairs, used = [], set()
    for spread, drop, keep in sorted(found):
        if drop not in used and keep not in used:
            pairs.append((drop, keep, spread))
            used |= {drop, keep}
    return pairs


@dataclass
class ClassStep:
    """One stage-1 step with K classes: the mean loss of each image's winner, the best class (B,), and, in
    the best class, the best head (B,) (0..M-1), the overall winner's index (B,) (heads, then extra), and the
    pose; ``rot`` / ``shift`` (K, B, ...) are each class's winning pose (for every class's pose memory). The loss
    is a 0-dim tensor on the device (as ``stage1.Stage1Result``)."""

    loss: Tensor
    best: Tensor
    win: Tensor
    overall: Tensor
    rot: Tensor
    shift: Tensor


def stage1_class_step(encoder, volumes, opt_encoder, opt_volume, batch: Batch, searched: list[SearchResult],
                      similarity: float, loss_kind: str = "l1", distill_weight: float = 1.0,
                      denom: int | None = None, reduce_grads: Callable[[], None] | None = None) -> ClassStep:
    """One optimisation step of the encoder (K x M heads) and the K volumes (``volumes``: ClassVolumes).

    ``searched[k]``: the pose search's best pose of each image in class k (``stage1.search_poses``, seeded by
    class k's memory and heads); its loss decides each image's class weights (``class_weights``). Each class
    is trained (``stage1.winner_terms``: heads + that candidate, winner takes all) on the images whose weight
    for it is > 0 only, their terms scaled by the weights: after the annealing, every image trains one class.
    ``denom`` / ``reduce_grads``: as ``stage1.stage1_step`` (a data-parallel rank's share)."""
    K, B = len(volumes), batch.idx.shape[0]
    M = encoder.heads // K
    losses = torch.stack([s.loss for s in searched], 1)  # (B, K)
    w = class_weights(losses, similarity)
    best = losses.argmin(1)
    encoder.train()
    opt_encoder.zero_grad(set_to_none=True)
    opt_volume.zero_grad(set_to_none=True)
    rot, shift = encoder(batch.images)  # (B, K * M, 3, 3), (B, K * M, 2)
    ms = max(float(encoder.max_shift), 1.0)
    total = rot.new_zeros(())
    R_all = torch.stack([s.rot for s in searched])  # (K, B, 3, 3): each class's pose for its memory
    t_all = torch.stack([s.shift for s in searched])
    win = torch.zeros(B, dtype=torch.long, device=rot.device)
    overall = torch.zeros_like(win)
    loss = losses.min(1).values.clone()
    for k in range(K):
        rows = (w[:, k] > 0).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        sub = batch_rows(batch, rows)
        vol = volumes[k]
        grid = vol.grid()
        rk, tk = rot[rows, k * M:(k + 1) * M], shift[rows, k * M:(k + 1) * M]
        per_h = candidate_losses(vol, sub, rk, tk, loss_kind, grid)
        wt: WinnerTerms = winner_terms(vol, sub, per_h, rk, tk, searched[k].rot[rows, None],
                                       searched[k].shift[rows, None], loss_kind, distill_weight, ms, grid)
        total = total + (w[rows, k] * wt.terms).sum()
        R_all[k, rows], t_all[k, rows] = wt.rot, wt.shift
        mine = best[rows] == k
        r = rows[mine]
        win[r], overall[r], loss[r] = wt.win[mine], wt.overall[mine], wt.loss[mine]
    (total / (B if denom is None else denom)).backward()
    if reduce_grads is not None:
        reduce_grads()
    opt_encoder.step()
    opt_volume.step()
    return ClassStep(loss.mean() if B else loss.new_zeros(()), best, win, overall, R_all, t_all)


@torch.no_grad()
def class_losses(volumes, batch: Batch, rot: Tensor, shift: Tensor, loss_kind: str = "l1") -> Tensor:
    """(B, K) losses of poses rot (K, B, 3, 3) / shift (K, B, 2), pose k in class k."""
    return torch.stack([candidate_losses(volumes[k], batch, rot[k][:, None], shift[k][:, None], loss_kind)[:, 0]
                        for k in range(len(volumes))], 1)
