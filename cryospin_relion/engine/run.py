"""The cryoSPIN schedule: stage 1 (auto-encoding) -> switch -> stage 2 (auto-decoding).

No file I/O here: ``AbinitEngine`` takes tensors and a config and keeps all state
in memory; ``state_dict()`` / ``load_state_dict()`` give a checkpoint made only of
tensors, dicts, lists and primitives (loadable with ``torch.load(weights_only=True)``).
The run lifecycle (``lifecycle/``) reads the data, writes checkpoints and outputs.

What the lifecycle uses (nothing else):
  - ``AbinitEngine(images, apix_work, ctf, config, device, progress=None)``
  - ``engine.run(should_stop, on_epoch_end, on_trial_epoch_end) -> "done" | "stopped"``
  - ``engine.resumable``: whether ``state_dict()`` may be checkpointed now (not during the stage-1 starts)
  - ``engine.position``: (epoch, stage, batch) for messages
  - ``engine.history``: the typed per-epoch records (engine/history.py)
  - ``engine.estimated_rows()``, ``engine.final_poses()``, ``engine.decoder_map()``

Pose memory and exploration (stage 1, ``explore_candidates > 0``, engine/stage1.py):
every image remembers its overall winning pose (model/pose_memory.py: the best
pose found so far, re-scored at each visit); each batch's winner-takes-all
candidate set is the M heads plus the result of a gradient-free search seeded by
the remembered pose and the heads. ``explore_candidates: 0`` is the reference
method (the memory then only records the winning heads).

Stage-1 subset: stage 1 trains on a fixed random subset of ``stage1_particles``
particles (all when N is smaller): finding the structure at low resolution does
not need every particle, and stage-1 cost then no longer grows with N.

Switch (stage 1 -> 2): after ``epochs_amortized`` epochs, or earlier (at least
``min_epochs_amortized``) once the median geodesic change of each subset image's
remembered (winning) pose between two epochs is below ``switch_threshold_deg``.
The pose table starts from the remembered poses; the particles outside the
subset first get theirs in one gradient-free pass: the encoder's heads (the
amortised inference the method is built on) seed the pose search against the
current volume (``_assign_unvisited``).

Coarse-to-fine, batch order and seeds: engine/schedule.py.

K classes (``classes`` > 1, engine/classes.py): K volumes, K x M heads, a pose memory per class and each
particle's class (``self.classes``). Stage 1 searches every image in every class and trains the classes by
annealed soft-to-hard weights, re-seeding classes that empty; the first-pose pass searches every class;
stage 2 refines each pose in its class and moves particles between classes after each epoch.

Data parallel (``world``, engine/distributed.py): every rank runs this same
schedule and computes, of each global batch, the rows it owns; gradients are
summed over the ranks before each step, the epoch's figures are summed after each
batch, and the per-particle tables are merged at each epoch end, after the
first-pose pass and on ``sync()`` (before a checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.config import AbinitConfig
from cryospin_relion.engine.checkpoint import engine_state, restore_engine
from cryospin_relion.engine.classes import (duplicate_classes, reform_epoch, reseed_plan, similarity_at,
                                            stage1_class_step)
from cryospin_relion.engine.distributed import ALONE, World
from cryospin_relion.engine.forward import Batch
from cryospin_relion.engine.history import (WINNER_SOURCES, EpochRecord, EpochTally, FirstPoseRecord, History,
                                            TrialsRecord, epoch_line, first_pose_line)
from cryospin_relion.engine.models import Models
from cryospin_relion.engine.particles import ParticleImages, RowView
from cryospin_relion.engine.progress import NoProgress, Progress
from cryospin_relion.engine.schedule import (FIRST_POSE_BATCH0, Seeds, crop_for_epoch, epoch_batches, should_switch,
                                             stage1_cap, stage1_lr_decoder, stage2_lr_decoder, trial_epochs)
from cryospin_relion.engine.stage1 import (FIRST_POSE_REFERENCE, ScanSlices, SearchResult, batch_rows,
                                           best_candidate, candidate_losses, first_poses, pose_fit, scan_batch,
                                           scan_slices, search_poses, search_sources, stage1_step)
from cryospin_relion.engine.stage2 import stage2_step
from cryospin_relion.engine.tally import PendingSums, value_counts
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations, super_fibonacci_rotations
from cryospin_relion.model.class_volumes import ClassVolumes
from cryospin_relion.model.encoder import PoseEncoder
from cryospin_relion.model.pose_memory import PoseMemory
from cryospin_relion.model.pose_table import PoseTable
from cryospin_relion.model.volume import HartleyVolume, SymmetricUpdates

log = logging.getLogger("cryospin.abinit")

PROGRESS_READ_S = 2.0  # the progress bar's loss is read from the device at most this often (each read waits for it)


class AbinitEngine:
    """The state of one ab-initio run (models, poses, schedule position, history) and its schedule."""

    def __init__(self, images, apix_work, ctf: CTF | None, config: AbinitConfig,
                 device: str | torch.device = "cpu", progress: Progress | None = None, world: World = ALONE,
                 volume_constraint: "SymmetricUpdates | None" = None, radial_scale: Tensor | None = None):
        self.cfg = config
        # applied to the volume after every batch's optimiser step(s), ``start`` at each epoch's (re)start
        # (model/volume.py SymmetricUpdates: --sym-mode impose; built by the lifecycle)
        self.volume_constraint = volume_constraint
        self.world = world
        self.device = torch.device(device)
        self.data = ParticleImages(images, apix_work, None if config.data.no_ctf else ctf, self.device)
        self.N, self.box = self.data.N, self.data.box
        self.K = config.model.classes
        self.classes = torch.zeros(self.N, dtype=torch.long, device=self.device)  # each particle's class, 0-based
        self.touched = torch.zeros(self.N, dtype=torch.bool)  # rows this rank updated since the last sync()
        if not world.alone and config.schedule.batch_size < 2 * world.size:
            raise ValueError(f"batch size {config.schedule.batch_size} < 2 x {world.size} ranks")
        self.progress = progress or NoProgress()
        self.seeds = Seeds(config.run.seed)
        self.max_shift = config.model.shift_bound(self.box)
        o = config.optim
        self.table = PoseTable(self.N, self.device, o.lr_pose, o.lr_shift, o.pose_betas, max_shift=self.max_shift)
        # the volume's radial preconditioner: from the images, or given (a class formed again alone takes its
        # run's, so that its volume's parameters mean what the class's do)
        self._radial = self.data.radial_scale() if radial_scale is None else radial_scale
        # the encoder sees the images Fourier-cropped to stage 1's largest Fourier box: stage 1 resolves
        # nothing finer, and the CNN costs box^2 (the paper preset 4x less at box 64)
        self.encoder_box = stage1_cap(config.schedule, self.box)
        self._in_trials = False  # the stage-1 starts are running (their state is not resumable)
        self._init_model(0)
        # stage 1 trains on a fixed random subset (all particles when stage1_particles is 0 or >= N)
        S = config.schedule.stage1_particles
        if 0 < S < self.N:
            self.s1_idx = torch.randperm(self.N, generator=Seeds.generator(self.seeds.subset()))[:S].sort().values
        else:
            self.s1_idx = torch.arange(self.N)
        self._grid: Tensor | None = None  # near-uniform rotations of the global search (made on first use)
        self._scans: dict[int, ScanSlices] = {}  # K > 1: each class's global-scan sections (``_class_scan``)
        self._frozen = False  # the volumes are fixed (the first-pose pass): the scan sections are made once
        self._reset_schedule()

    # -- state ---------------------------------------------------------------------------------
    def _init_model(self, trial: int) -> None:
        """Fresh models and pose memory for stage-1 start ``trial`` (0 = the seed's own)."""
        self.trial = trial
        self.models = Models.build(self.cfg, self.box, self.encoder_box, self.max_shift, self._radial,
                                   self.seeds.model(trial), self.device)
        # one pose memory per class (class 0's is the run's only one with K = 1): each its own random start
        if self.cfg.search.enabled:
            self.memories = [PoseMemory.random(self.N, Seeds.generator(self.seeds.memory(trial) + 104_729 * k),
                                               self.device) for k in range(self.K)]
        else:
            self.memories = [PoseMemory.identity(self.N, self.device) for _ in range(self.K)]
        self.classes.zero_()

    def _reset_schedule(self) -> None:
        self.epoch = 0  # completed epochs
        self.stage = 1
        self.batch_pos = 0  # completed batches in the current epoch
        self.done = False
        self.prev_R: Tensor | None = None  # remembered (stage 1) / table (stage 2) poses at the last epoch end
        self._new_tally()
        self.history = History()

    def _new_tally(self) -> None:
        """An empty tally for a new epoch, and its device-side sums (engine/tally.py)."""
        self.tally = EpochTally.for_ranks(self.cfg.model.heads, self.world.size)
        self.pending = PendingSums(self.cfg.model.heads, self.device)
        self._peeked, self._shown_loss = time.perf_counter(), None

    def _drain(self) -> None:
        """The device-side sums of the batches since the last drain into ``tally`` (a collective)."""
        self.tally.add_sums(*self.pending.drain(self.world))

    def _show_progress(self) -> None:
        """The progress bar's update; the running loss is read from the device at most every
        ``PROGRESS_READ_S`` seconds (each read waits for the GPU), and only when the progress is drawn."""
        if not isinstance(self.progress, NoProgress) and time.perf_counter() - self._peeked >= PROGRESS_READ_S:
            self._peeked = time.perf_counter()
            self._shown_loss = self.pending.peek_loss()
        self.progress.update(self._shown_loss, self.tally.images_per_s)

    @property
    def resumable(self) -> bool:
        """Whether ``state_dict()`` now resumes the run where it is (false during the stage-1 starts, which
        a stop resets to the beginning)."""
        return not self._in_trials

    @property
    def position(self) -> tuple[int, int, int]:
        """(completed epochs, stage, completed batches of the current epoch)."""
        return self.epoch, self.stage, self.batch_pos

    @property
    def memory(self) -> PoseMemory:
        """Class 0's pose memory (the only one with one class)."""
        return self.memories[0]

    @property
    def encoder(self) -> PoseEncoder:
        return self.models.encoder

    @property
    def volume(self) -> HartleyVolume | ClassVolumes:
        return self.models.volume

    def class_volume(self, k: int) -> HartleyVolume:
        """Class ``k``'s volume (the volume itself with one class)."""
        return self.volume if self.K == 1 else self.volume[k]

    # -- the schedule ------------------------------------------------------------------------------
    def crop(self, epoch: int | None = None) -> int:
        return crop_for_epoch(self.cfg.schedule, self.box, self.epoch if epoch is None else epoch,
                              self.history.switch_epoch)

    def lr_decoder_now(self) -> float:
        o = self.cfg.optim
        if self.stage == 2:
            return stage2_lr_decoder(o.lr_decoder_stage2, o.stage2_lr_particles, self.N)
        return stage1_lr_decoder(o.lr_decoder, o.lr_decoder_decay, self.epoch)

    @property
    def total_epochs_max(self) -> int:
        s = self.cfg.schedule
        first = self.history.switch_epoch if self.history.switch_epoch is not None else s.epochs_amortized
        return first + s.epochs_autodecode

    def estimated_rows(self) -> Tensor:
        """Rows whose current pose is an estimate: the stage-1 subset before the switch, all after."""
        return self.s1_idx if self.stage == 1 else torch.arange(self.N)

    def batch(self, idx: Tensor, crop: int, images: Tensor | None = None) -> Batch:
        return self.data.batch(idx, crop, self.cfg.model.mask_radius, self.encoder_box if self.stage == 1 else None,
                               images)

    def run(self, should_stop: Callable[[], bool] | None = None,
            on_epoch_end: Callable[["AbinitEngine"], None] | None = None,
            on_trial_epoch_end: Callable[["AbinitEngine"], None] | None = None) -> str:
        """Train until the schedule ends ("done") or ``should_stop()`` turns true ("stopped").

        ``should_stop`` is polled after every batch; a stopped engine is at a batch
        boundary and its ``state_dict()`` resumes exactly there (during the stage-1 starts,
        see ``resumable``, it is reset to the beginning instead).
        ``on_epoch_end`` follows every epoch after the starts and the choice of the start;
        ``on_trial_epoch_end`` every epoch of the starts (e.g. to record pose errors, no checkpoint).
        """
        should_stop = should_stop or (lambda: False)
        if self._trials_pending():
            if not self._run_trials(should_stop, on_trial_epoch_end):
                return "stopped"
            if on_epoch_end is not None:
                on_epoch_end(self)
        while not self.done:
            if not self._run_epoch(should_stop):
                return "stopped"
            self._end_epoch()
            if on_epoch_end is not None:
                on_epoch_end(self)
            if should_stop() and not self.done:
                return "stopped"
        return "done"

    def _trials_pending(self) -> bool:
        return (self.cfg.schedule.stage1_trials > 1 and trial_epochs(self.cfg.schedule) >= 1 and self.epoch == 0
                and self.batch_pos == 0 and self.history.trials is None)

    def _run_trials(self, should_stop, on_trial_epoch_end=None) -> bool:
        """Several starts of stage 1 (``stage1_trials``), each ``stage1_trial_epochs`` epochs from its own
        random model, pose memory and search; the start with the lowest loss continues, the others are
        dropped (cf. the several classes of cryoSPARC's ab-initio). Why: a start can settle in a wrong pose
        basin within the first epochs, and its loss is then already higher. Measured at box 32 (2,000
        particles, SNR 0.3): with one start 2 of 6 seeds ended at 22 and 58 deg median error, their epoch-3
        loss 0.848-0.851 against 0.821-0.836; with 3 starts all 6 seeds end at 6.9-7.2 deg.
        A stop during the starts resets the engine to the beginning."""
        K, E = self.cfg.schedule.stage1_trials, trial_epochs(self.cfg.schedule)
        best, losses, t0, kept_s = None, [], time.perf_counter(), 0.0
        self._in_trials = True
        try:
            for k in range(K):
                if k > 0:
                    self._init_model(k)
                    self._reset_schedule()
                for _ in range(E):
                    if not self._run_epoch(should_stop):
                        self._init_model(0)
                        self._reset_schedule()
                        return False
                    self._end_epoch()
                    if on_trial_epoch_end is not None:
                        on_trial_epoch_end(self)
                loss = self.history.last.loss
                losses.append(loss)
                log.info(f"stage-1 start {k + 1}/{K}: loss {loss:.5g} after {E} epochs")
                if best is None or loss < best[0]:
                    best = (loss, copy.deepcopy(self.state_dict()))
                    kept_s = self.history.last.time_s
        finally:
            self._in_trials = False
        if best[1]["trial"] != self.trial:
            self.load_state_dict(best[1])
        self.history.trials = TrialsRecord(losses, self.trial, E, time.perf_counter() - t0 - kept_s)
        log.info(f"continuing from start {self.trial + 1} of {K} (lowest loss)")
        return True

    def _run_epoch(self, should_stop) -> bool:
        s = self.cfg.schedule
        if self.stage == 1:
            parts = epoch_batches(self.seeds.order(self.epoch, self.trial), len(self.s1_idx), s.batch_size)
            batches = [self.s1_idx[b] for b in parts]
        else:
            batches = epoch_batches(self.seeds.order(self.epoch, None), self.N, s.batch_size)
        c = self.crop()
        self.progress.start(f"epoch {self.epoch + 1}/{self.total_epochs_max} stage {self.stage} box {c}",
                            len(batches), self.batch_pos)
        if self.batch_pos == 0:
            self._scans.clear()  # an epoch's first batch renews every class's scan sections
        if self.batch_pos == 0 and self.stage == 2:
            self.prev_R = self.table.rotations.clone()
        opt = self.models.opt_volume1 if self.stage == 1 else self.models.opt_volume2
        for gr in opt.param_groups:
            gr["lr"] = self.lr_decoder_now()
        if self.volume_constraint is not None:  # a fresh, restored or chosen-start volume: its reference
            self.volume_constraint.start(self.volume)
        shares = [self._share(rows) for rows in batches[self.batch_pos:]]
        try:
            with self.data.prefetch([rows for rows, _ in shares]) as ready:  # reads overlap compute
                for bi, (rows, dist), images in zip(range(self.batch_pos, len(batches)), shares, ready):
                    t0 = time.perf_counter()
                    self.touched[rows] = True  # for the next sync()
                    b = self.batch(rows, c, images)
                    n = len(rows)
                    if self.stage == 1:
                        batch_step = self._stage1_batch if self.K == 1 else self._stage1_class_batch
                        loss, wins, sources = batch_step(b, bi, dist)
                    else:
                        if self.K > 1:
                            b.cls = self.classes[b.idx]
                        o = self.cfg.optim
                        loss = stage2_step(self.volume, self.table, self.models.opt_volume2, b, o.pose_iters,
                                           o.vol_iters, self.cfg.model.loss, denom=None if dist is None else dist[1],
                                           reduce_grads=None if dist is None else self._sum_volume_grads).loss
                        wins = sources = None
                    if self.volume_constraint is not None:
                        self.volume_constraint(self.volume)
                    self.pending.add(loss, n, wins, sources)  # on the device: no host read per batch
                    self.tally.add_batch(n if dist is None else dist[1], time.perf_counter() - t0)
                    self.batch_pos = bi + 1
                    self._show_progress()
                    if self.batch_pos < len(batches) and should_stop():
                        return False
        finally:
            self.progress.close()
        self.sync()
        return True

    # -- data parallelism (engine/distributed.py) -------------------------------------------------
    def _share(self, rows: Tensor) -> tuple[Tensor, tuple[Tensor, int] | None]:
        """This rank's rows of global batch ``rows`` (all when alone), and on a rank of a data-parallel run
        (their positions in the global batch, its size). The caller marks them in ``touched`` when it
        updates them."""
        if self.world.alone:
            return rows, None
        pos = self.world.share(len(rows))
        return rows[pos], (pos, len(rows))

    def sync(self) -> None:
        """Every particle's row from the rank that updated it to every rank (collective; a no-op alone).
        After it, every rank's ``state_dict()`` is the whole run's."""
        w = self.world
        self._drain()
        if w.alone:
            return
        count = w.sum_(self.touched.to(torch.int32))
        for t in (*(x for m in self.memories for x in (m.rotations, m.shifts)), self.classes, self.table.rotations,
                  self.table.shifts, self.table.m, self.table.v, self.table.steps):
            w.merge_rows(t, self.touched, count)
        self.touched.zero_()

    def _sum_volume_grads(self) -> None:
        self.world.sum_grads(self.volume.parameters())

    def _sum_model_grads(self) -> None:
        self.world.sum_grads([*self.encoder.parameters(), *self.volume.parameters()])

    def _stage1_batch(self, b: Batch, bi: int, dist: tuple[Tensor, int] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """One stage-1 step; the overall winners go to the pose memory. Returns the loss (0-dim), each image's
        best head, and where each overall winner came from (WINNER_SOURCES index), on the device. ``dist``:
        (the rows' positions in the global batch, its size) on a rank of a data-parallel run."""
        cfg = self.cfg
        ex = self.explore(b, bi, dist)
        out = stage1_step(self.encoder, self.volume, self.models.opt_encoder, self.models.opt_volume1, b,
                          cfg.model.loss, extra_rot=None if ex is None else ex.rot[:, None],
                          extra_shift=None if ex is None else ex.shift[:, None],
                          distill_weight=cfg.search.distill_weight, denom=None if dist is None else dist[1],
                          reduce_grads=None if dist is None else self._sum_model_grads)
        self.memory.remember(b.idx, out.rot, out.shift)
        if ex is None:
            src = torch.zeros_like(out.overall)
        else:  # a head seed that wins the search is a head win (ties go to the heads)
            src = torch.where(out.overall < cfg.model.heads, 0, ex.source.clamp_min(1))
        return out.loss, out.win, src

    def _stage1_class_batch(self, b: Batch, bi: int, dist: tuple[Tensor, int] | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """``_stage1_batch`` with K classes (engine/classes.py): each image searched in every class, the classes
        trained by the annealed class weights; every class's memory keeps its winner, ``classes`` the best."""
        cfg, M = self.cfg, self.cfg.model.heads
        with torch.no_grad():
            heads = self._heads(b.images)  # one forward pass, every class's heads
        searched = [self.explore(b, bi, dist, k, heads) for k in range(self.K)]
        out = stage1_class_step(self.encoder, self.volume, self.models.opt_encoder, self.models.opt_volume1, b,
                                searched, similarity_at(cfg.schedule, self.epoch), cfg.model.loss,
                                cfg.search.distill_weight, denom=None if dist is None else dist[1],
                                reduce_grads=None if dist is None else self._sum_model_grads)
        for k, m in enumerate(self.memories):
            m.remember(b.idx, out.rot[k], out.shift[k])
        self.classes[b.idx] = out.best
        found = torch.stack([x.source for x in searched], 0).gather(0, out.best[None])[0]
        src = torch.where(out.overall < M, 0, found.clamp_min(1))
        return out.loss, out.win, src

    def _heads(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's head poses (B, K * M, 3, 3), (B, K * M, 2), in eval mode."""
        was = self.encoder.training
        self.encoder.eval()
        hr, ht = self.encoder(images)
        self.encoder.train(was)
        return hr, ht

    def _class_heads(self, heads: tuple[Tensor, Tensor], k: int | None) -> tuple[Tensor, Tensor]:
        """Class ``k``'s M heads of ``_heads`` (None: all)."""
        if k is None:
            return heads
        M = self.cfg.model.heads
        return heads[0][:, k * M:(k + 1) * M], heads[1][:, k * M:(k + 1) * M]

    def explore(self, b: Batch, bi: int, dist: tuple[Tensor, int] | None = None,
                k: int | None = None, heads: tuple[Tensor, Tensor] | None = None) -> SearchResult | None:
        """Exploration candidate of each image of a stage-1 batch (engine/stage1.py ``search_poses``):
        seeds = the remembered pose and the heads' current poses (detached), refined by the search.
        The generator is seeded by (seed, start, epoch, batch), so a resumed run draws the same candidates.
        None when exploration is off.
        With K classes, ``k`` is the class searched (its volume, memory and heads, its own random stream); with
        exploration off it is then the best of the class's heads (K classes need each class's best pose).
        ``heads``: ``_heads(b.images)`` when already computed for the batch.
        """
        sc = self.cfg.search
        if not sc.enabled and k is None:
            return None
        with torch.no_grad():
            hr, ht = self._class_heads(self._heads(b.images) if heads is None else heads, k)
            vol, mem = self.class_volume(k or 0), self.memories[k or 0]
            if not sc.enabled:
                R, t, loss = best_candidate(vol, b, hr, ht, self.cfg.model.loss)
                z = torch.zeros_like(loss, dtype=torch.long)
                return SearchResult(R, t, loss, z, z)
            seeds_R = torch.cat([mem.rotations[b.idx][:, None], hr], 1)
            seeds_t = torch.cat([mem.shifts[b.idx][:, None], ht], 1)
            g = Seeds.generator(self.seeds.search(self.trial, self.epoch, bi) + 7_777_777 * (k or 0))
            return search_poses(vol, b, seeds_R, seeds_t, g, self.search_grid(), sc, self.max_shift,
                                self.cfg.model.loss, draw_rows=None if dist is None else dist[0],
                                draw_batch=None if dist is None else dist[1], scan=self._class_scan(k, b, bi))

    def _class_scan(self, k: int | None, b: Batch, bi: int) -> ScanSlices | None:
        """Class ``k``'s global-scan sections for batch ``bi`` (None: made afresh by the search, one class in
        training). In the first-pose pass (``_frozen``: no volume changes) they are made once per class for the
        whole pass. In stage-1 training with K classes: renewed at every K-th batch (k, k + K, ...) and at each
        epoch's first, else those of an earlier batch of the epoch (at most K - 1 steps old).

        Why: the sections of the 4,608 scan rotations are the search's costliest part and cost the same for
        any number of images, so K classes would pay K times one class's scan per batch; this way they pay
        one. The scan only ranks: its best candidates are re-scored on the live volume. Kept in the
        checkpoint, so a resumed run is the same."""
        if k is None and not self._frozen:
            return None
        k = k or 0
        c = self._scans.get(k)
        gb = scan_batch(b, self.cfg.search)
        if c is None or c.crop != gb.crop or (not self._frozen and (bi - k) % self.K == 0):
            g = Seeds.generator(self.seeds.search(self.trial, self.epoch, bi) + 5_555_555 * (k + 1))
            Q = random_rotations(1, g, dtype=torch.float32)[0].to(self.device, non_blocking=True)
            c = self._scans[k] = scan_slices(self.class_volume(k), self.search_grid() @ Q, gb)
        return c

    def search_grid(self) -> Tensor:
        """The global scan's near-uniform rotations (``explore_candidates``), made on first use."""
        if self._grid is None:
            self._grid = super_fibonacci_rotations(self.cfg.search.explore_candidates,
                                                   dtype=torch.float32).to(self.device)
        return self._grid

    @torch.no_grad()
    def _assign_unvisited(self) -> FirstPoseRecord:
        """First poses of the particles outside the stage-1 subset, against the current volume at the last
        stage-1 Fourier box, written into the pose memory (config ``first_pose``): ``amortized`` = the
        encoder's heads (one forward pass) refined locally, and the global scan only for the images whose
        head-local fit is poor (engine/stage1.py ``first_poses``); ``search`` = ``explore`` (the global scan +
        refinement seeded by the random start and the heads); ``heads`` = the best head (the reference switch,
        and what any mode does without exploration). With K classes every class is searched (each class's
        memory keeps its pose) and each particle joins the class of the lowest loss. Returns the pass's record
        (without its time)."""
        cfg = self.cfg
        mode = cfg.search.first_pose if cfg.search.enabled else "heads"
        mask = torch.ones(self.N, dtype=torch.bool)
        mask[self.s1_idx] = False
        rows = mask.nonzero()[:, 0]
        c = self.crop()
        batches = list(torch.tensor_split(rows, max(1, math.ceil(len(rows) / cfg.schedule.batch_size))))
        scan_below = self._scan_below(c) if mode == "amortized" else None
        # sources, then images scanned: summed on the device, read once after the pass (engine/tally.py)
        counts = torch.zeros(len(WINNER_SOURCES) + 1, dtype=torch.float64, device=self.device)
        self.progress.start(f"first poses of {len(rows)} more particles, box {c}", len(batches), 0)
        self._scans.clear()  # made once per class for the pass, from the final stage-1 volumes
        self._frozen = True
        try:
            for bi, all_idx in enumerate(batches):
                idx, dist = self._share(all_idx)
                self.touched[idx] = True
                if len(idx) == 0:  # no collectives in this loop: a rank may have nothing of a small batch
                    self.progress.update(None, None)
                    continue
                b = self.batch(idx, c)
                heads = self._heads(b.images)  # one encoder pass for every class
                found = [self._first_pose(b, bi, dist, mode, scan_below, k, heads) for k in range(self.K)]
                loss = torch.stack([f[4] for f in found], 1)  # (B, K)
                best = loss.argmin(1)
                for k, (R, t, *_) in enumerate(found):
                    self.memories[k].remember(b.idx, R, t)
                self.classes[b.idx] = best
                src = torch.stack([f[2] for f in found]).gather(0, best[None])[0]
                scanned = torch.stack([f[3] for f in found]).any(0)
                counts[:len(WINNER_SOURCES)] += value_counts(src, len(WINNER_SOURCES))
                counts[-1:] += scanned.sum()
                self.progress.update(None, None)
        finally:
            self._frozen = False
            self._scans.clear()
            self.progress.close()
        self.sync()
        n = [int(round(x)) for x in self.world.sum_floats(counts.tolist())]
        return FirstPoseRecord(mode, len(rows), n[-1], dict(zip(WINNER_SOURCES, n[:-1])),
                               scan_below=scan_below)

    def _scan_below(self, crop: int) -> float:
        """The amortized first poses' rule: the global scan for fits below ``first_pose_scan_below`` x the median
        fit of stage-1 subset images at their remembered poses in their classes (the same on every rank: no
        collective)."""
        cfg = self.cfg
        ref = self.s1_idx[:FIRST_POSE_REFERENCE]
        fits = []
        for r in torch.split(ref, cfg.schedule.batch_size):
            b = self.batch(r, crop)
            own = self.classes[b.idx]
            for k in range(self.K):
                sel = (own == k).nonzero()[:, 0]
                if len(sel):
                    sub = b if self.K == 1 else batch_rows(b, sel)
                    m = self.memories[k]
                    fits.append(pose_fit(self.class_volume(k), sub, m.rotations[sub.idx], m.shifts[sub.idx],
                                         cfg.model.loss))
        ref_fit = float(torch.cat(fits).median())
        # a reference <= 0 (stage 1 explains nothing) leaves no basis for trusting the heads: scan all (fit < 1)
        below = cfg.search.first_pose_scan_below
        return below * ref_fit if ref_fit > 0 else float(below > 0)

    def _first_pose(self, b: Batch, bi: int, dist, mode: str, scan_below: float | None, k: int,
                    heads: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One batch's first poses in class ``k``: (rotations, shifts, WINNER_SOURCES index, sent to the scan,
        loss), each (B, ...). ``heads``: ``_heads(b.images)``."""
        cfg = self.cfg
        if mode == "search":
            ex = self.explore(b, FIRST_POSE_BATCH0 + bi, dist, None if self.K == 1 else k, heads)
            return ex.rot, ex.shift, search_sources(ex), torch.ones_like(ex.loss, dtype=torch.bool), ex.loss
        hr, ht = self._class_heads(heads, None if self.K == 1 else k)
        vol = self.class_volume(k)
        if mode == "amortized":
            g = Seeds.generator(self.seeds.search(self.trial, self.epoch, FIRST_POSE_BATCH0 + bi) + 7_777_777 * k)
            fp = first_poses(vol, b, hr, ht, g, self.search_grid(), cfg.search, self.max_shift, scan_below,
                             cfg.model.loss, draw_rows=None if dist is None else dist[0],
                             draw_batch=None if dist is None else dist[1], scan=self._class_scan(k, b, bi))
            return fp.rot, fp.shift, fp.source, fp.scanned, fp.loss
        R, t, loss = best_candidate(vol, b, hr, ht, cfg.model.loss)
        z = torch.zeros_like(loss, dtype=torch.long)
        return R, t, z, z.bool(), loss

    def _end_epoch(self) -> None:
        cfg, h, a = self.cfg, self.history, self.tally
        e = self.epoch
        t_move = time.perf_counter()
        moved = self._move_classes() if self.K > 1 and self.stage == 2 else None
        a.time_s += time.perf_counter() - t_move if moved is not None else 0.0  # part of the epoch's time
        if self.stage == 1:
            rows = self.s1_idx.to(self.device)
            change = (float(geodesic_distance_deg(self.prev_R[rows].double(),
                                                  self.remembered()[0][rows].double()).median())
                      if self.prev_R is not None else float("nan"))
            share = [w / max(1, sum(a.wins)) for w in a.wins]
            sources = dict(zip(WINNER_SOURCES, (x / max(1, sum(a.sources)) for x in a.sources)))
        else:
            change = float(geodesic_distance_deg(self.prev_R.double(), self.table.rotations.double()).median())
            share = sources = None
        rec = EpochRecord(
            epoch=e + 1, stage=self.stage, loss=a.loss, time_s=(h.last.time_s if h.last else 0.0) + a.time_s,
            epoch_time_s=a.time_s, images_per_s=a.images_per_s, crop=self.crop(),
            lr_encoder=cfg.optim.lr_encoder if self.stage == 1 else 0.0,
            lr_decoder=self.lr_decoder_now(),
            lr_pose=0.0 if self.stage == 1 else cfg.optim.lr_pose,
            head_wins=list(a.wins) if self.stage == 1 else None, head_win_share=share,
            winner_source_share=sources, pose_change_deg=None if math.isnan(change) else change, switched=False,
            class_sizes=self.class_sizes() if self.K > 1 else None, class_moves=moved,
            rank_images=list(a.rank_images))
        if self.stage == 1:
            if self.K > 1 and e + 1 >= cfg.schedule.class_anneal_epochs:  # ... merge duplicates (engine/classes.py)
                self._empty_duplicate_classes(e + 1)
                rec.class_sizes = self.class_sizes()
            if self.K > 1 and e + 1 == reform_epoch(cfg.schedule):  # ... and form each class again alone
                t0 = time.perf_counter()
                self._reform_classes(e + 1)
                dt = time.perf_counter() - t0
                rec.time_s += dt
                rec.epoch_time_s += dt
            if should_switch(cfg.schedule, e + 1, change):
                if len(self.s1_idx) < self.N:
                    t0 = time.perf_counter()
                    fp = self._assign_unvisited()
                    h.assign_s = fp.seconds = time.perf_counter() - t0
                    h.first_poses = fp
                    log.info(first_pose_line(fp, len(self.s1_idx), self.crop()))
                    rec.time_s += h.assign_s
                    rec.epoch_time_s += h.assign_s
                self.table.set(*self.remembered())
                self.stage = 2
                h.switch_epoch = e + 1
                rec.switched = True
                if self.K > 1:  # every particle now has a class
                    rec.class_sizes = self.class_sizes()
            elif self.K > 1 and e + 1 < cfg.schedule.class_anneal_epochs:  # re-seed while forming, then
                self._reseed_classes(e + 1)
            self.prev_R = self.remembered()[0].clone()
        h.epochs.append(rec)
        log.info(epoch_line(rec, a.time_s, cfg.search.enabled))
        self.epoch += 1
        self.batch_pos = 0
        self._new_tally()
        if self.stage == 2 and self.epoch >= h.switch_epoch + cfg.schedule.epochs_autodecode:
            self.done = True

    # -- classes (engine/classes.py) ------------------------------------------------------------
    def remembered(self) -> tuple[Tensor, Tensor]:
        """Each particle's remembered pose in its own class: rotations (N, 3, 3), shifts (N, 2)."""
        if self.K == 1:
            return self.memory.rotations, self.memory.shifts
        R = torch.stack([m.rotations for m in self.memories])  # (K, N, 3, 3)
        t = torch.stack([m.shifts for m in self.memories])
        ar = torch.arange(self.N, device=R.device)
        return R[self.classes, ar], t[self.classes, ar]

    def class_sizes(self) -> list[int]:
        """Particles per class among the rows whose pose is an estimate (the stage-1 subset before the switch)."""
        rows = self.estimated_rows().to(self.device)
        return torch.bincount(self.classes[rows], minlength=self.K).tolist()

    def _reseed_classes(self, epoch: int) -> None:
        """Split the largest class into each class with less than ``class_min_share`` of its even share of the
        stage-1 subset (``reseed_plan``, ``ClassVolumes.split``): half the volume, the same pose memory, fresh
        Adam state. The same on every rank (the sizes are of the merged ``classes``)."""
        sizes = self.class_sizes()
        for dst, src in reseed_plan(sizes, self.cfg.schedule.class_min_share * len(self.s1_idx) / self.K):
            self.volume.split(src, dst)
            self._forget_volume_steps(dst)
            self.memories[dst].rotations.copy_(self.memories[src].rotations)
            self.memories[dst].shifts.copy_(self.memories[src].shifts)
            self.history.class_reseeds.append({"epoch": epoch, "class": dst, "from_class": src})
            log.info(f"class {dst + 1} held {sizes[dst]} of {len(self.s1_idx)} particles: re-seeded by splitting "
                     f"class {src + 1} ({sizes[src]})")

    def _forget_volume_steps(self, k: int) -> None:
        """Drop class ``k``'s volume state from both volume optimisers (Adam's moments): a re-seeded or emptied
        class starts its steps afresh."""
        for opt in (self.models.opt_volume1, self.models.opt_volume2):
            for p in self.volume[k].parameters():
                opt.state.pop(p, None)

    @torch.no_grad()
    def _empty_duplicate_classes(self, epoch: int) -> None:
        """Empty the smaller of each pair of classes that hold one structure (``duplicate_classes``, threshold
        ``class_duplicate_deg``; 0 = never): its volume is zeroed (``ClassVolumes.clear``, fresh Adam state) and
        its particles join the larger class, at their remembered poses there. The same on every rank."""
        deg = self.cfg.schedule.class_duplicate_deg
        if deg <= 0:
            return
        rows = self.estimated_rows().to(self.device)
        rots = [m.rotations[rows] for m in self.memories]
        sizes = self.class_sizes()
        for drop, keep, spread in duplicate_classes(rots, self.classes[rows], deg):
            self.volume.clear(drop)
            self._forget_volume_steps(drop)
            self.classes[self.classes == drop] = keep
            self.history.class_merges.append({"epoch": epoch, "class": drop, "into_class": keep,
                                              "spread_deg": round(spread, 2)})
            log.info(f"class {drop + 1} ({sizes[drop]}) held the structure of class {keep + 1} ({sizes[keep]}): "
                     f"their poses of the same particles differ by one rotation (median deviation "
                     f"{spread:.1f} deg); its particles joined class {keep + 1} and it was emptied")

    def _reform_classes(self, epoch: int) -> None:
        """Form each class but the largest again alone: ``class_reform_epochs`` epochs of a one-class run
        (``_formed_alone``) from random poses on the class's own particles. The re-formed class replaces the class
        (volume, its particles' remembered poses in it, fresh Adam state) when its mean loss on those particles,
        at the Fourier box both were trained at, is lower. The same on every rank (rank 0's result is broadcast).
        The largest class is the structure that took shape first (it won most images, in the start of lowest
        loss); re-forming it would cost a one-class stage 1 over most of the subset.

        Why: while the assignments are soft, every class learns from every image, and a minority structure's
        class can settle on a low-resolution blob between the structures: it holds its particles (they fit the
        other classes worse) but never resolves. On the 60/40 two-structure mixture of bench/classes.py, class B
        ended so in 6 of 12 K = 2 runs at 2,000 particles. Once the assignments are hard, a class's particles can
        form their own structure as in a one-class run. Measured at 4,000 particles, seed 2: B's class ended at
        18.1 A (1.87x its known-pose map), its poses 72 deg off; formed again alone (1,144 particles, loss 0.825
        against 0.905) it ended at 9.98 A (1.03x), 4.1 deg off. The re-formation takes the run's own starts and
        schedule, so it forms what a one-class run forms: at 2,000 particles (800 B, which one-class runs on B
        alone form in 4 of 6 seeds) it did not rescue seed 2. A stop waits for it (a minute or so)."""
        s = self.cfg.schedule
        rows_all = self.estimated_rows()
        own, largest = self.classes[rows_all.to(self.device)].cpu(), int(np.argmax(self.class_sizes()))
        for k in range(self.K):
            rows = rows_all[own == k]
            if len(rows) < s.batch_size or k == largest:
                continue
            log.info(f"forming class {k + 1} ({len(rows)} particles) again alone for {s.class_reform_epochs} epochs")
            alone = self._formed_alone(k, rows)
            # the Fourier box that both have been trained at: a longer re-formation would win by its finer shells
            crop = min(alone.crop(s.class_reform_epochs - 1), self.crop(epoch - 1))
            dev_rows = rows.to(self.device)
            m = self.memories[k]
            loss = self._mean_loss(self.data, self.class_volume(k), rows, m.rotations[dev_rows], m.shifts[dev_rows],
                                   crop)
            new = self._mean_loss(alone.data, alone.volume, torch.arange(len(rows)), alone.memory.rotations,
                                  alone.memory.shifts, crop)
            replace = bool(self.world.from_main_(torch.tensor([float(new < loss)], device=self.device))[0] > 0)
            if replace:
                vol = self.class_volume(k)
                vol.load_state_dict(alone.volume.state_dict())
                m.rotations[dev_rows], m.shifts[dev_rows] = alone.memory.rotations, alone.memory.shifts
                for t in (*vol.parameters(), m.rotations, m.shifts):
                    self.world.from_main_(t.data)
                self._forget_volume_steps(k)
                self._scans.pop(k, None)
            self.history.class_reforms.append({"epoch": epoch, "class": k, "particles": len(rows),
                                               "loss": round(loss, 6), "reformed_loss": round(new, 6),
                                               "replaced": replace})
            log.info(f"class {k + 1} ({len(rows)} particles) formed again alone for {s.class_reform_epochs} epochs: "
                     f"loss {new:.5g} against {loss:.5g} at box {crop}, "
                     + ("replaced by the re-formed class" if replace else "kept"))

    def _formed_alone(self, k: int, rows: Tensor) -> "AbinitEngine":
        """A one-class engine on the particles ``rows`` (sorted, CPU) after ``class_reform_epochs`` stage-1
        epochs from random poses: this run's schedule from its start (its starts, no switch), class ``k``'s own
        seed, and this run's radial preconditioner, so that its volume's parameters mean what class ``k``'s do."""
        s, E = self.cfg.schedule, self.cfg.schedule.class_reform_epochs
        sched = dataclasses.replace(
            s, stage1_particles=0,
            c2f_epochs=s.c2f_epochs if s.c2f_epochs is not None else s.min_epochs_amortized + 1,
            epochs_amortized=max(s.epochs_amortized, E + 1), min_epochs_amortized=max(s.min_epochs_amortized, E + 1))
        cfg = dataclasses.replace(self.cfg, schedule=sched, model=dataclasses.replace(self.cfg.model, classes=1),
                                  run=dataclasses.replace(self.cfg.run, seed=self.cfg.run.seed + 1_000_003 * (k + 1)))
        dev_rows = rows.to(self.device)
        ctf = None if self.data.ctf is None else self.data.ctf[dev_rows]
        level = log.level
        log.setLevel(logging.WARNING)  # its epochs are not this run's
        try:
            alone = AbinitEngine(RowView(self.data.images, rows), self.data.apix[dev_rows], ctf, cfg, self.device,
                                 radial_scale=self._radial)
            if E > trial_epochs(sched) and alone._trials_pending():
                alone._run_trials(lambda: False)
            while alone.epoch < E:
                alone._run_epoch(lambda: False)
                alone._end_epoch()
        finally:
            log.setLevel(level)
        return alone

    @torch.no_grad()
    def _mean_loss(self, data: ParticleImages, volume, idx: Tensor, rot: Tensor, shift: Tensor, crop: int) -> float:
        """Mean loss of the images ``idx`` (CPU) of ``data`` at poses rot (n, 3, 3), shift (n, 2), Fourier box
        ``crop``."""
        total, B = 0.0, self.cfg.schedule.batch_size * 4
        for a in range(0, len(idx), B):
            b = data.batch(idx[a:a + B], crop, self.cfg.model.mask_radius)
            total += float(candidate_losses(volume, b, rot[a:a + B, None], shift[a:a + B, None],
                                            self.cfg.model.loss).sum())
        return total / max(1, len(idx))

    @torch.no_grad()
    def _move_classes(self) -> int:
        """After a stage-2 epoch: each particle moves to the class whose remembered pose (``memories``, refined
        locally) fits its image better than its refined pose in its own class (at the epoch's Fourier box); the
        pose it leaves
        is remembered for its old class, and its pose-table row restarts (Adam state) from the new class's
        pose. Returns the number of particles moved (all ranks)."""
        c, K, sc = self.crop(), self.K, self.cfg.search
        # one refinement round at the search's finest scale: a remembered pose was refined against its class's
        # volume of the last epoch, which has moved by one stage-2 epoch since (1-3 degrees); three rounds from
        # the coarsest scale cost 2.5x the stage-2 epoch itself at K = 3 and changed nothing
        f = 2 ** max(0, sc.explore_rounds - 1)
        fine = dataclasses.replace(sc, explore_rounds=min(1, sc.explore_rounds),
                                   explore_local_deg=sc.explore_local_deg / f, explore_shift_px=sc.explore_shift_px / f)
        todo = torch.arange(self.N) if self.world.alone else self.world.share(self.N)
        moved = 0
        for a, idx in enumerate(torch.split(todo, self.cfg.schedule.batch_size * 4)):
            b = self.batch(idx, c)
            i = b.idx
            own = self.classes[i]
            Rt, tt = self.table.rotations[i], self.table.shifts[i]
            L = torch.empty(len(i), K, device=i.device)
            for k in range(K):
                m, vol = self.memories[k], self.volume[k]
                mine = own == k
                r = mine.nonzero()[:, 0]
                if len(r):
                    L[r, k] = candidate_losses(vol, batch_rows(b, r), Rt[r, None], tt[r, None],
                                               self.cfg.model.loss)[:, 0]
                # the remembered pose in another class is refined locally first (search_poses without the scan):
                # it was found against that class's volume of an earlier epoch
                r = (~mine).nonzero()[:, 0]
                if len(r):
                    g = Seeds.generator(self.seeds.search(self.trial, self.epoch, 2 * FIRST_POSE_BATCH0 + a) + k)
                    ref = search_poses(vol, batch_rows(b, r), m.rotations[i[r]][:, None], m.shifts[i[r]][:, None], g,
                                       None, fine, self.max_shift, self.cfg.model.loss)
                    m.rotations[i[r]], m.shifts[i[r]], L[r, k] = ref.rot, ref.shift, ref.loss
            new = L.argmin(1)
            go = (new != own) & (L.gather(1, new[:, None])[:, 0] < L.gather(1, own[:, None])[:, 0])
            sel = go.nonzero()[:, 0]
            if len(sel):
                r, old, nw, Rl, tl = i[sel], own[sel], new[sel], Rt[sel], tt[sel]
                for k in range(K):
                    m, o, n = self.memories[k], old == k, nw == k
                    self.table.rotations[r[n]], self.table.shifts[r[n]] = m.rotations[r[n]], m.shifts[r[n]]
                    m.rotations[r[o]], m.shifts[r[o]] = Rl[o], tl[o]  # the pose left behind, for the old class
                self.table.m[r], self.table.v[r], self.table.steps[r] = 0, 0, 0
                self.classes[r] = nw
                moved += len(sel)
            self.touched[idx] = True
        self.sync()
        return moved if self.world.alone else int(round(self.world.sum_floats([float(moved)])[0]))

    def final_classes(self) -> np.ndarray:
        """(N,) int64: each particle's class, 0-based (all 0 with one class)."""
        return self.classes.cpu().numpy().astype(np.int64)

    def decoder_maps(self) -> list[Tensor]:
        """The K learned volumes in real space, each (n, n, n) float32 on the CPU (hand not flipped)."""
        if self.K == 1:
            return [self.decoder_map()]
        return [m.cpu() for m in self.volume.real_maps()]

    # -- results -------------------------------------------------------------------------
    def final_poses(self) -> tuple[np.ndarray, np.ndarray]:
        """(rotations (N, 3, 3) RELION A, shifts (N, 2) working-box pixels, content translation).

        From the pose table after the switch, else from the pose memory."""
        if self.stage == 2:
            R, t = self.table.rotations, self.table.shifts
        else:
            R, t = self.remembered()
        return R.detach().double().cpu().numpy(), t.detach().double().cpu().numpy()

    def decoder_map(self) -> Tensor:
        """The learned volume in real space, (n, n, n) float32 on the CPU (hand not flipped); class 0's with K
        classes."""
        return self.class_volume(0).real_map().cpu()

    # -- checkpoint (engine/checkpoint.py) ----------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole run's state; on a rank of a data-parallel run, call ``sync()`` on every rank first."""
        if self.world.alone:
            self._drain()
        return engine_state(self)

    def load_state_dict(self, d: dict) -> None:
        restore_engine(self, d)
        self.pending = PendingSums(self.cfg.model.heads, self.device)  # the restored tally has every batch's sums
