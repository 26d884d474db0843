"""The schedule of a run as pure functions: Fourier box per epoch, batch order, and every random seed.

Coarse-to-fine: stage-1 epoch e works on the central c(e) x c(e) Fourier box,
c(e) = c0 + (cap - c0) * min(1, e / c2f_epochs), rounded to even, c0 = c2f_start * cap,
cap = min(n, stage1_max_crop); stage 2 grows from cap to n over c2f_stage2_epochs
epochs (``crop_for_epoch``).

Batches: epoch e visits its particles in the order randperm seeded by
(stream seed, e), split into ceil(N / batch_size) near-equal batches
(``epoch_batches``); a run stopped mid-epoch resumes at the next batch of the
same order, so a resumed run is identical to an uninterrupted one on CPU.

Seeds: every random number of a run comes from a ``torch.Generator`` seeded by
``Seeds`` from the run's ``seed`` alone (no global random state is used after
the models are built, and the models are built under their own seed). Streams:

=====================  ==========================================  ==============================
stream                 seed                                         draws
=====================  ==========================================  ==============================
stage-1 subset         seed * 31 + 11                               which particles stage 1 sees
model of start k       m_k = seed + 7919 k                          encoder/volume initialisation
pose memory of start   m_k * 7919 + 3                               random first remembered poses
batch order, stage 1   m_k * 1,000,003 + e + 17                     order of epoch e (each start
                                                                    its own: a bad start must not
                                                                    share the others' order)
batch order, stage 2   seed * 1,000,003 + e + 17                    order of epoch e
search of a batch      m_k * 1,000,003 + 7919 e + b + 12,345        grid turn, local perturbations
                                                                    (b = 1,000,000 + i for batch i
                                                                    of the first-pose pass)
=====================  ==========================================  ==============================

The multipliers are primes far apart, so the streams of one run do not repeat
each other's seeds for any realistic epoch and batch counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_relion.config import ScheduleConfig

# batch index offset of the first-pose pass (it is not an epoch's batch; its search stream must differ)
FIRST_POSE_BATCH0 = 1_000_000


@dataclass(frozen=True)
class Seeds:
    """The seed of every random stream of a run (see the module docstring)."""

    seed: int

    def subset(self) -> int:
        return self.seed * 31 + 11

    def model(self, trial: int) -> int:
        return self.seed + 7919 * trial

    def memory(self, trial: int) -> int:
        return self.model(trial) * 7919 + 3

    def order(self, epoch: int, trial: int | None) -> int:
        """Batch order of an epoch: stage 1 of start ``trial``, or stage 2 (``trial`` None)."""
        base = self.seed if trial is None else self.model(trial)
        return base * 1_000_003 + epoch + 17

    def search(self, trial: int, epoch: int, batch: int) -> int:
        return self.model(trial) * 1_000_003 + 7_919 * epoch + batch + 12_345

    @staticmethod
    def generator(seed: int) -> torch.Generator:
        """A CPU generator (the same numbers on every device)."""
        return torch.Generator().manual_seed(int(seed))


def epoch_batches(order_seed: int, n: int, batch_size: int) -> list[Tensor]:
    """The batches (index tensors into range(n)) of one epoch: a seeded permutation in near-equal parts."""
    perm = torch.randperm(n, generator=Seeds.generator(order_seed))
    return list(torch.tensor_split(perm, max(1, math.ceil(n / batch_size))))


def stage1_cap(cfg: ScheduleConfig, box: int) -> int:
    """Largest Fourier box of stage 1 (``stage1_max_crop``, with coarse-to-fine only)."""
    if not cfg.coarse_to_fine or not cfg.stage1_max_crop:
        return box
    return min(box, cfg.stage1_max_crop)


def crop_for_epoch(cfg: ScheduleConfig, box: int, epoch: int, switch_epoch: int | None = None) -> int:
    """Fourier box of epoch ``epoch`` (0-based); ``switch_epoch`` = stage-1 epochs once switched, else None.

    Stage 1 grows linearly from c2f_start * cap to cap = min(box, stage1_max_crop) by epoch c2f_epochs
    (default min_epochs_amortized + 1); stage 2 grows from cap to box over its first c2f_stage2_epochs."""
    if not cfg.coarse_to_fine:
        return box
    cap = stage1_cap(cfg, box)
    if switch_epoch is not None and epoch >= switch_epoch:
        k, E2 = epoch - switch_epoch, cfg.c2f_stage2_epochs
        if cap >= box or E2 <= 0 or k + 1 >= E2:
            return box
        return min(box, int(round((cap + (box - cap) * (k + 1) / E2) / 2)) * 2)
    c0 = max(8, int(round(cfg.c2f_start * cap / 2)) * 2)
    E = cfg.c2f_epochs if cfg.c2f_epochs is not None else cfg.min_epochs_amortized + 1
    if c0 >= cap or E <= 0 or epoch >= E:
        return cap
    c = c0 + (cap - c0) * epoch / E
    return min(cap, int(round(c / 2)) * 2)


def trial_epochs(cfg: ScheduleConfig) -> int:
    """Epochs of each stage-1 start: stage1_trial_epochs, kept below the first possible switch."""
    return min(cfg.stage1_trial_epochs, cfg.min_epochs_amortized - 1, cfg.epochs_amortized - 1)


def should_switch(cfg: ScheduleConfig, epochs_done: int, pose_change_deg: float) -> bool:
    """Stage 1 ends after epochs_amortized epochs, or (auto_switch) after at least min_epochs_amortized once
    the median change of the remembered poses between two epochs is below switch_threshold_deg."""
    return epochs_done >= cfg.epochs_amortized or (
        cfg.auto_switch and epochs_done >= cfg.min_epochs_amortized and not math.isnan(pose_change_deg)
        and pose_change_deg < cfg.switch_threshold_deg)


def stage1_lr_decoder(lr: float, decay: float, epoch: int) -> float:
    """Stage-1 volume learning rate of epoch ``epoch``: lr * decay^epoch."""
    return lr * decay ** epoch


def stage2_lr_decoder(lr: float, ref_particles: int, n_particles: int) -> float:
    """Stage-2 volume learning rate per step: ``lr`` up to ``ref_particles`` particles, then
    lr * ref_particles / N (``ref_particles`` 0: always ``lr``).

    Why: stage 2 takes N / batch volume steps per epoch, and each Adam step moves the
    volume by about the learning rate whatever the gradient's size, while each pose
    moves once per epoch. At a constant rate the volume's drift per epoch -- largely
    along the joint rotation of map and poses that the loss cannot see -- grows with
    N, and the poses chase it: measured on 50,000 particles at box 64 with lr 1e-2,
    the stage-2 loss rose every epoch and the pose change per epoch grew from 4.8 to
    13.6 deg, while at 10,000 particles it fell from 3.4 to 0.6 deg. Scaling by 1/N
    keeps the volume's movement per epoch (lr x steps) what it is at ``ref_particles``:
    the schedule is defined per particle visit rather than per step."""
    if ref_particles <= 0 or n_particles <= ref_particles:
        return lr
    return lr * ref_particles / n_particles
