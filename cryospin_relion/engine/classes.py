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
from cryospin_relion.engine.stage1 import SearchResult, WinnerTerms, batch_rows, candidate_losses, winner_terms


def similarity_at(cfg: ScheduleConfig, epoch: int) -> float:
    """The class similarity of stage-1 epoch ``epoch`` (0-based): ``class_similarity`` x (1 - epoch / E),
    E = ``class_anneal_epochs``, and 0 from epoch E on (hard assignments)."""
    E = cfg.class_anneal_epochs
    if E <= 0 or epoch >= E:
        return 0.0
    return cfg.class_similarity * (1.0 - epoch / E)


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


@dataclass
class ClassStep:
    """One stage-1 step with K classes: the mean loss of each image's winner, the best class (B,), and, in
    the best class, the best head (B,) (0..M-1), the overall winner's index (B,) (heads, then extra), and the
    pose; ``rot`` / ``shift`` (K, B, ...) are each class's winning pose (for every class's pose memory)."""

    loss: float
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
    return ClassStep(float(loss.mean()) if B else 0.0, best, win, overall, R_all, t_all)


@torch.no_grad()
def class_losses(volumes, batch: Batch, rot: Tensor, shift: Tensor, loss_kind: str = "l1") -> Tensor:
    """(B, K) losses of poses rot (K, B, 3, 3) / shift (K, B, 2), pose k in class k."""
    return torch.stack([candidate_losses(volumes[k], batch, rot[k][:, None], shift[k][:, None], loss_kind)[:, 0]
                        for k in range(len(volumes))], 1)
