"""The cryoSPIN schedule: stage 1 (auto-encoding) -> switch -> stage 2 (auto-decoding).

No file I/O here: ``AbinitEngine`` takes tensors and a config and keeps all state
in memory; ``state_dict()`` / ``load_state_dict()`` give a checkpoint made only of
tensors, dicts, lists and primitives (loadable with ``torch.load(weights_only=True)``).
The command (``commands/abinit.py``) reads the data, writes checkpoints and outputs.

Entry points:
  - ``AbinitEngine(images, apix_work, ctf, config, device)``
  - ``engine.run(should_stop=None, on_epoch_end=None) -> "done" | "stopped"``
  - ``engine.final_poses() -> (rotations (N, 3, 3) RELION A float64, shifts_px (N, 2))``
  - ``engine.decoder_map() -> (n, n, n) float32``
  - ``run_abinit(...)`` one-call wrapper.

Pose memory and exploration (stage 1, ``explore_candidates > 0``, engine/stage1.py):
every image remembers its overall winning pose (``win_R``, ``win_t``: the best pose
found so far, re-scored at each visit); each batch's winner-takes-all candidate set
is the M heads plus the result of a gradient-free search seeded by the remembered
pose and the heads. ``explore_candidates: 0`` is the reference method (the memory
then only records the winning heads).

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

Coarse-to-fine: stage-1 epoch e works on the central c(e) x c(e) Fourier box,
c(e) = c0 + (cap - c0) * min(1, e / c2f_epochs), rounded to even, c0 = c2f_start * cap,
cap = min(n, stage1_max_crop); stage 2 grows from cap to n over c2f_stage2_epochs
epochs (``crop_for_epoch``).

Batches: epoch e visits the particles in the order randperm(N) seeded by
(seed, e), split into ceil(N / batch_size) near-equal batches; a run stopped
mid-epoch resumes at the next batch of the same order, so a resumed run is
identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.config import AbinitConfig
from cryospin_relion.engine.losses import prepare_batch
from cryospin_relion.engine.stage1 import search_poses, stage1_step, super_fibonacci_rotations
from cryospin_relion.engine.stage2 import stage2_step
from cryospin_relion.geometry.fourier import fourier_crop_2d, ht2_centered
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations
from cryospin_relion.model.encoder import PoseEncoder
from cryospin_relion.model.pose_table import PoseTable
from cryospin_relion.model.volume import HartleyVolume, radial_profile_2d

log = logging.getLogger("cryospin.abinit")

CHECKPOINT_VERSION = 1
def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def stage1_cap(cfg: AbinitConfig, box: int) -> int:
    """Largest Fourier box of stage 1 (``stage1_max_crop``, with coarse-to-fine only)."""
    if not cfg.coarse_to_fine or not cfg.stage1_max_crop:
        return box
    return min(box, cfg.stage1_max_crop)


def crop_for_epoch(cfg: AbinitConfig, box: int, epoch: int, switch_epoch: int | None = None) -> int:
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


def _epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 17)
    perm = torch.randperm(n, generator=g)
    nb = max(1, math.ceil(n / batch_size))
    return list(torch.tensor_split(perm, nb))


def _rng_state() -> dict:
    st = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss_next": py[2]},
    }


def _set_rng_state(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    n = d["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = d["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _new_history() -> dict:
    """Per-epoch lists; time_s is cumulative training time, epoch_time_s per epoch; head_wins (M,) counts
    and head_win_share fractions in stage 1 (None in stage 2): how often each head is the best of the heads
    (a share near 1 for one head = head collapse); winner_source_share: where each image's overall winner
    came from in stage 1 (heads / memory / local / global, see engine/stage1.py; None in stage 2);
    pose_change_deg = median geodesic change of each image's pose (remembered winner in stage 1, table in
    stage 2) since the previous epoch."""
    return {k: [] for k in ("epoch", "stage", "loss", "time_s", "epoch_time_s", "images_per_s", "crop", "lr_encoder",
                            "lr_decoder", "lr_pose", "head_wins", "head_win_share", "winner_source_share",
                            "pose_change_deg", "switched")} | {
        "switch_epoch": None}


class AbinitEngine:
    """Holds the model, optimisers, pose table and schedule state of one ab-initio run."""

    def __init__(self, images, apix_work, ctf: dict[str, Tensor] | None, config: AbinitConfig,
                 device: str | torch.device = "cpu", progress: bool = True):
        self.cfg = config
        self.device = torch.device(device)
        self.images = images  # (N, n, n) numpy memmap / array or tensor (kept on the host)
        self.N, self.box = int(images.shape[0]), int(images.shape[-1])
        if self.box % 2:
            raise ValueError("the working box must be even")
        ap = torch.as_tensor(apix_work, dtype=torch.float32)
        self.apix = (ap.expand(self.N) if ap.ndim == 0 else ap).to(self.device).contiguous()
        self.ctf = None if (ctf is None or config.no_ctf) else {k: torch.as_tensor(v, dtype=torch.float32).to(self.device) for k, v in ctf.items()}
        self.progress = progress
        self.max_shift = config.shift_bound(self.box)
        self.table = PoseTable(self.N, self.device, config.lr_pose, config.lr_shift, config.pose_betas, max_shift=self.max_shift)
        self._radial = self._radial_scale()
        # the encoder sees the images Fourier-cropped to stage 1's largest Fourier box: stage 1 resolves
        # nothing finer, and the CNN costs box^2 (the paper preset 4x less at box 64)
        self.encoder_box = stage1_cap(config, self.box)
        self.trial = 0  # which stage-1 start (``stage1_trials``) the model comes from
        self.in_trials = False  # true while the stage-1 starts run (their state is not resumable)
        self._init_model(0)
        # stage 1 trains on a fixed random subset (all particles when stage1_particles is 0 or >= N)
        S = config.stage1_particles
        if 0 < S < self.N:
            g1 = torch.Generator().manual_seed(int(config.seed) * 31 + 11)
            self.s1_idx = torch.randperm(self.N, generator=g1)[:S].sort().values
        else:
            self.s1_idx = torch.arange(self.N)
        self._grid: Tensor | None = None  # near-uniform rotations of the global search (made on first use)
        self.prev_R: Tensor | None = None  # winning (stage 1) / table (stage 2) poses at the previous epoch end
        self.epoch = 0  # completed epochs
        self.stage = 1
        self.batch_pos = 0  # completed batches in the current epoch
        self.done = False
        self.acc = self._new_acc()
        self.history = _new_history()

    def model_seed(self, trial: int | None = None) -> int:
        """Seed of the model initialisation and of the search's random numbers of a stage-1 start."""
        return int(self.cfg.seed) + 7919 * int(self.trial if trial is None else trial)

    def _init_model(self, trial: int) -> None:
        """Fresh encoder, volume, optimisers and pose memory for stage-1 start ``trial`` (0 = the seed's)."""
        cfg, n = self.cfg, self.box
        self.trial = trial
        ms = self.model_seed(trial)
        torch.manual_seed(ms)
        self.encoder = PoseEncoder(self.encoder_box, cfg.heads, self.max_shift, cfg.preset, cfg.octaves).to(self.device)
        self.volume = HartleyVolume(n, cfg.volume_param, cfg.mask_radius, self._radial).to(self.device)
        self.opt_encoder = torch.optim.Adam(self.encoder.parameters(), lr=cfg.lr_encoder)
        self.opt_volume1 = torch.optim.Adam(self.volume.parameters(), lr=cfg.lr_decoder)
        self.opt_volume2 = torch.optim.Adam(self.volume.parameters(), lr=cfg.lr_decoder_stage2)
        # per-image pose memory: the overall stage-1 winner of the image's last visit (with exploration the
        # best pose found so far, which is itself a candidate of the next visit); starts at random rotations
        # (identity for the reference method, where it is only a record of the winning heads)
        if cfg.explore_candidates > 0:
            g0 = torch.Generator().manual_seed(ms * 7919 + 3)
            self.win_R = random_rotations(self.N, g0, dtype=torch.float32).to(self.device)
        else:
            self.win_R = torch.eye(3, device=self.device).repeat(self.N, 1, 1)
        self.win_t = torch.zeros(self.N, 2, device=self.device)

    # -- helpers -------------------------------------------------------------------
    def _new_acc(self) -> dict:
        return {"loss_sum": 0.0, "count": 0, "time_s": 0.0, "wins": [0] * self.cfg.heads,
                "sources": [0, 0, 0, 0]}

    def explore(self, b, bi: int) -> dict | None:
        """Exploration candidate of each image of a stage-1 batch (engine/stage1.py ``search_poses``):
        seeds = the remembered pose and the heads' current poses (detached), plus explore_candidates
        uniformly random rotations, refined by explore_rounds rounds of explore_local perturbations.
        The generator is seeded by (seed, epoch, batch), so a resumed run draws the same candidates.
        None when exploration is off."""
        cfg = self.cfg
        if cfg.explore_candidates <= 0:
            return None
        g = torch.Generator().manual_seed(self.model_seed() * 1_000_003 + 7_919 * int(self.epoch) + int(bi) + 12_345)
        with torch.no_grad():
            was = self.encoder.training
            self.encoder.eval()
            hr, ht = self.encoder(b.images)
            self.encoder.train(was)
        seeds_R = torch.cat([self.win_R[b.idx][:, None], hr], 1)
        seeds_t = torch.cat([self.win_t[b.idx][:, None], ht], 1)
        if self._grid is None:
            self._grid = super_fibonacci_rotations(cfg.explore_candidates).to(self.device)
        return search_poses(self.volume, b, seeds_R, seeds_t, g, self._grid, cfg.explore_top, cfg.explore_rounds,
                            cfg.explore_local, cfg.explore_local_deg, cfg.explore_shift_px, self.max_shift, cfg.loss,
                            grid_crop=cfg.explore_grid_crop, shift_range=cfg.explore_shift_range * self.box,
                            shift_step=cfg.explore_shift_step)

    def _load_images(self, idx: Tensor) -> Tensor:
        ii = idx.numpy()
        if isinstance(self.images, Tensor):
            x = self.images[idx]
        else:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(self.images[np.sort(ii)]), dtype=np.float32))
            order = np.argsort(np.argsort(ii))  # back to idx order
            x = x[torch.from_numpy(order)]
        return x.to(device=self.device, dtype=torch.float32)

    def _radial_scale(self) -> Tensor:
        """Preconditioner per shell over up to 512 evenly spaced images: the RMS of the images'
        Hartley coefficients divided by the RMS of their CTF (clamped at 0.1), i.e. the typical
        magnitude of the volume's coefficients (low frequencies, damped by the CTF, are large)."""
        k = min(self.N, 512)
        idx = torch.from_numpy(np.unique(np.linspace(0, self.N - 1, k).round().astype(np.int64)))
        x = self._load_images(idx)
        prof = radial_profile_2d(ht2_centered(x) / self.box).cpu()
        if self.ctf is not None:
            from cryospin_relion.engine.losses import ctf_cropped

            c = ctf_cropped(self.box, self.box, self.apix[idx.to(self.device)],
                            {k: v[idx.to(self.device)] for k, v in self.ctf.items()})
            prof = prof / radial_profile_2d(c).cpu().clamp_min(0.1)
        return prof

    def batch(self, idx: Tensor, crop: int):
        idx = idx.to(self.device)
        imgs = self._load_images(idx.cpu())
        ctf = None if self.ctf is None else {k: v[idx] for k, v in self.ctf.items()}
        b = prepare_batch(idx, imgs, self.apix[idx], ctf, crop, self.cfg.mask_radius)
        if self.stage == 1 and self.encoder_box < self.box:
            b.images = fourier_crop_2d(b.images, self.encoder_box)  # the encoder's input (see __init__)
        return b

    def crop(self, epoch: int | None = None) -> int:
        return crop_for_epoch(self.cfg, self.box, self.epoch if epoch is None else epoch, self.history["switch_epoch"])

    def pose_rows(self) -> Tensor:
        """Rows whose current pose is an estimate: the stage-1 subset before the switch, all after."""
        return self.s1_idx if self.stage == 1 else torch.arange(self.N)

    def lr_decoder_now(self) -> float:
        """Stage-1 volume learning rate of the current epoch: lr_decoder * lr_decoder_decay^epoch."""
        return self.cfg.lr_decoder * self.cfg.lr_decoder_decay ** self.epoch

    @property
    def total_epochs_max(self) -> int:
        if self.history["switch_epoch"] is not None:
            return self.history["switch_epoch"] + self.cfg.epochs_autodecode
        return self.cfg.epochs_amortized + self.cfg.epochs_autodecode

    @torch.no_grad()
    def _assign_unvisited(self) -> None:
        """First poses of the particles outside the stage-1 subset, against the current volume at the last
        stage-1 Fourier box: the best of the encoder's heads (amortised inference; the reference switch) or,
        with exploration, the pose search seeded by the heads (``explore``). Written into the pose memory."""
        from tqdm import tqdm

        from cryospin_relion.engine.stage1 import multihead_losses

        cfg = self.cfg
        mask = torch.ones(self.N, dtype=torch.bool)
        mask[self.s1_idx] = False
        rows = mask.nonzero()[:, 0]
        c = self.crop()
        batches = list(torch.tensor_split(rows, max(1, math.ceil(len(rows) / cfg.batch_size))))
        was = self.encoder.training
        self.encoder.eval()
        try:
            for bi, idx in enumerate(tqdm(batches, desc=f"first poses of {len(rows)} more particles, box {c}",
                                          disable=not self.progress, leave=False, dynamic_ncols=True, unit="batch")):
                b = self.batch(idx, c)
                if cfg.explore_candidates > 0:
                    ex = self.explore(b, 1_000_000 + bi)
                    R, t = ex["rot"], ex["shift"]
                else:
                    per, rot, shift = multihead_losses(self.encoder, self.volume, b, cfg.loss)
                    ar = torch.arange(len(idx), device=per.device)
                    k = per.argmin(1)
                    R, t = rot[ar, k], shift[ar, k]
                self.win_R[b.idx] = R
                self.win_t[b.idx] = t
        finally:
            self.encoder.train(was)
        log.info(f"first poses of the {len(rows)} particles outside the stage-1 subset of {len(self.s1_idx)} "
                 f"(encoder heads{' + pose search' if cfg.explore_candidates > 0 else ''}, box {c})")

    # -- the schedule ------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] | None = None,
            on_epoch_end: Callable[["AbinitEngine"], None] | None = None,
            on_trial_epoch_end: Callable[["AbinitEngine"], None] | None = None) -> str:
        """Train until the schedule ends ("done") or ``should_stop()`` turns true ("stopped").

        ``should_stop`` is polled after every batch; a stopped engine is at a batch
        boundary and its ``state_dict()`` resumes exactly there (during the stage-1 starts,
        ``in_trials``, it is reset to the beginning instead: do not checkpoint then).
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

    def trial_epochs(self) -> int:
        """Epochs of each stage-1 start: stage1_trial_epochs, kept below the first possible switch."""
        c = self.cfg
        return min(c.stage1_trial_epochs, c.min_epochs_amortized - 1, c.epochs_amortized - 1)

    def _trials_pending(self) -> bool:
        return (self.cfg.stage1_trials > 1 and self.trial_epochs() >= 1 and self.epoch == 0
                and self.batch_pos == 0 and "trials" not in self.history)

    def _reset_schedule(self) -> None:
        self.epoch, self.batch_pos, self.stage, self.done = 0, 0, 1, False
        self.prev_R = None
        self.acc = self._new_acc()
        self.history = _new_history()

    def _run_trials(self, should_stop, on_trial_epoch_end=None) -> bool:
        """Several starts of stage 1 (``stage1_trials``), each ``stage1_trial_epochs`` epochs from its own
        random model, pose memory and search; the start with the lowest loss continues, the others are
        dropped (cf. the several classes of cryoSPARC's ab-initio). Why: a start can settle in a wrong pose
        basin within the first epochs, and its loss is then already higher. Measured at box 32 (2,000
        particles, SNR 0.3): with one start 2 of 6 seeds ended at 22 and 58 deg median error, their epoch-3
        loss 0.848-0.851 against 0.821-0.836; with 3 starts all 6 seeds end at 6.9-7.2 deg.
        A stop during the starts resets the engine to the beginning."""
        K, E = self.cfg.stage1_trials, self.trial_epochs()
        best, losses, t0, kept_s = None, [], time.perf_counter(), 0.0
        self.in_trials = True
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
                loss = self.history["loss"][-1]
                losses.append(loss)
                log.info(f"stage-1 start {k + 1}/{K}: loss {loss:.5g} after {E} epochs")
                if best is None or loss < best[0]:
                    best = (loss, copy.deepcopy(self.state_dict()))
                    kept_s = self.history["time_s"][-1]
        finally:
            self.in_trials = False
        if best[1]["trial"] != self.trial:
            self.load_state_dict(best[1])
        self.history["trials"] = {"loss": losses, "chosen": self.trial, "epochs": E,
                                  "dropped_s": time.perf_counter() - t0 - kept_s}
        log.info(f"continuing from start {self.trial + 1} of {K} (lowest loss)")
        return True

    def _run_epoch(self, should_stop) -> bool:
        from tqdm import tqdm

        cfg = self.cfg
        if self.stage == 1:
            batches = [self.s1_idx[b] for b in _epoch_order(self.model_seed(), self.epoch, len(self.s1_idx), cfg.batch_size)]
        else:
            batches = _epoch_order(cfg.seed, self.epoch, self.N, cfg.batch_size)
        c = self.crop()
        desc = f"epoch {self.epoch + 1}/{self.total_epochs_max} stage {self.stage} box {c}"
        bar = tqdm(total=len(batches), initial=self.batch_pos, desc=desc, disable=not self.progress,
                   leave=False, dynamic_ncols=True, unit="batch")
        if self.batch_pos == 0 and self.stage == 2:
            self.prev_R = self.table.rotations.clone()
        if self.stage == 1:
            for gr in self.opt_volume1.param_groups:
                gr["lr"] = self.lr_decoder_now()
        try:
            for bi in range(self.batch_pos, len(batches)):
                t0 = time.perf_counter()
                b = self.batch(batches[bi], c)
                if self.stage == 1:
                    ex = self.explore(b, bi)
                    out = stage1_step(self.encoder, self.volume, self.opt_encoder, self.opt_volume1, b, cfg.loss,
                                      extra_rot=None if ex is None else ex["rot"][:, None],
                                      extra_shift=None if ex is None else ex["shift"][:, None],
                                      distill_weight=cfg.distill_weight)
                    self.win_R[b.idx] = out["rot"]
                    self.win_t[b.idx] = out["shift"]
                    counts = torch.bincount(out["win"], minlength=cfg.heads).tolist()
                    self.acc["wins"] = [a + int(x) for a, x in zip(self.acc["wins"], counts)]
                    # overall winner: head / remembered pose / local perturbation / global candidate
                    if ex is None:
                        src = torch.zeros_like(out["overall"])
                    else:  # a head seed that wins the search is a head win (ties go to the heads)
                        src = torch.where(out["overall"] < cfg.heads, 0, ex["source"].clamp_min(1))
                    self.acc["sources"] = [a + int(x) for a, x in
                                           zip(self.acc["sources"], torch.bincount(src, minlength=4).tolist())]
                else:
                    out = stage2_step(self.volume, self.table, self.opt_volume2, b, cfg.pose_iters, cfg.vol_iters, cfg.loss)
                nb = int(b.idx.shape[0])
                self.acc["loss_sum"] += out["loss"] * nb
                self.acc["count"] += nb
                self.acc["time_s"] += time.perf_counter() - t0
                self.batch_pos = bi + 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.acc['loss_sum'] / self.acc['count']:.4g}",
                                img_s=f"{self.acc['count'] / max(self.acc['time_s'], 1e-9):.0f}")
                if self.batch_pos < len(batches) and should_stop():
                    return False
        finally:
            bar.close()
        return True

    def _end_epoch(self) -> None:
        cfg, h, a = self.cfg, self.history, self.acc
        e = self.epoch
        if self.stage == 1:
            rows = self.s1_idx.to(self.device)
            change = (float(geodesic_distance_deg(self.prev_R[rows].double(), self.win_R[rows].double()).median())
                      if self.prev_R is not None else float("nan"))
            tot = max(1, sum(a["wins"]))
            share = [w / tot for w in a["wins"]]
            stot = max(1, sum(a["sources"]))
            sources = dict(zip(("heads", "memory", "local", "global"), (x / stot for x in a["sources"])))
        else:
            change = float(geodesic_distance_deg(self.prev_R.double(), self.table.rotations.double()).median())
            share = sources = None
        h["epoch"].append(e + 1)
        h["stage"].append(self.stage)
        h["loss"].append(a["loss_sum"] / max(1, a["count"]))
        h["time_s"].append((h["time_s"][-1] if h["time_s"] else 0.0) + a["time_s"])
        h["epoch_time_s"].append(a["time_s"])
        h["images_per_s"].append(a["count"] / max(a["time_s"], 1e-9))
        h["crop"].append(self.crop())
        h["lr_encoder"].append(cfg.lr_encoder if self.stage == 1 else 0.0)
        h["lr_decoder"].append(self.lr_decoder_now() if self.stage == 1 else cfg.lr_decoder_stage2)
        h["lr_pose"].append(0.0 if self.stage == 1 else cfg.lr_pose)
        h["head_win_share"].append(share)
        h["head_wins"].append(list(a["wins"]) if self.stage == 1 else None)
        h.setdefault("winner_source_share", [None] * (len(h["epoch"]) - 1)).append(sources)
        h["pose_change_deg"].append(None if math.isnan(change) else change)
        switched = False
        if self.stage == 1:
            n_done = e + 1
            if n_done >= cfg.epochs_amortized or (
                cfg.auto_switch and n_done >= cfg.min_epochs_amortized and not math.isnan(change)
                and change < cfg.switch_threshold_deg
            ):
                if len(self.s1_idx) < self.N:
                    t0 = time.perf_counter()
                    self._assign_unvisited()
                    h["assign_s"] = time.perf_counter() - t0
                    h["time_s"][-1] += h["assign_s"]
                    h["epoch_time_s"][-1] += h["assign_s"]
                self.table.set(self.win_R, self.win_t)
                self.stage = 2
                h["switch_epoch"] = n_done
                switched = True
            self.prev_R = self.win_R.clone()
        h["switched"].append(switched)
        msg = (f"epoch {e + 1} stage {h['stage'][-1]} box {h['crop'][-1]} loss {h['loss'][-1]:.5g} "
               f"time {a['time_s']:.1f}s ({h['images_per_s'][-1]:.0f} img/s)")
        if change == change:
            msg += f" pose change {change:.2f} deg"
        if share is not None:
            msg += " heads " + "/".join(f"{100 * s:.0f}" for s in share) + "%"
            if cfg.explore_candidates > 0:
                msg += " winners " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sources.items())
        if switched:
            msg += f" -> switch to auto-decoding after {e + 1} epochs"
        log.info(msg)
        self.epoch += 1
        self.batch_pos = 0
        self.acc = self._new_acc()
        if self.stage == 2 and self.epoch >= h["switch_epoch"] + cfg.epochs_autodecode:
            self.done = True

    # -- results -------------------------------------------------------------------------
    def final_poses(self) -> tuple[np.ndarray, np.ndarray]:
        """(rotations (N, 3, 3) RELION A, shifts (N, 2) working-box pixels, content translation).

        From the pose table after the switch, else from the winning heads."""
        if self.stage == 2:
            R, t = self.table.rotations, self.table.shifts
        else:
            R, t = self.win_R, self.win_t
        R = R.detach().double().cpu().numpy()
        t = t.detach().double().cpu().numpy()
        return R, t

    def decoder_map(self) -> Tensor:
        """The learned volume in real space, (n, n, n) float32 on the CPU (hand not flipped: the command does it)."""
        return self.volume.real_map().cpu()

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "n_particles": self.N,
            "box": self.box,
            "epoch": self.epoch,
            "stage": self.stage,
            "batch_pos": self.batch_pos,
            "done": self.done,
            "trial": self.trial,
            "acc": dict(self.acc, wins=list(self.acc["wins"]), sources=list(self.acc["sources"])),
            "history": self.history,
            "encoder": {k: v.cpu() for k, v in self.encoder.state_dict().items()},
            "volume": {k: v.cpu() for k, v in self.volume.state_dict().items()},
            "opt_encoder": _opt_to_cpu(self.opt_encoder.state_dict()),
            "opt_volume1": _opt_to_cpu(self.opt_volume1.state_dict()),
            "opt_volume2": _opt_to_cpu(self.opt_volume2.state_dict()),
            "pose_table": self.table.state_dict(),
            "win_R": self.win_R.cpu(),
            "win_t": self.win_t.cpu(),
            "prev_R": None if self.prev_R is None else self.prev_R.cpu(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"unsupported checkpoint version {d.get('version')}")
        if d["n_particles"] != self.N or d["box"] != self.box:
            raise ValueError(f"checkpoint is for {d['n_particles']} particles at box {d['box']}, "
                             f"not {self.N} at box {self.box}")
        dev = self.device
        self.encoder.load_state_dict(d["encoder"])
        self.volume.load_state_dict(d["volume"])
        self.opt_encoder.load_state_dict(d["opt_encoder"])
        self.opt_volume1.load_state_dict(d["opt_volume1"])
        self.opt_volume2.load_state_dict(d["opt_volume2"])
        self.table.load_state_dict(d["pose_table"])
        self.win_R, self.win_t = d["win_R"].to(dev), d["win_t"].to(dev)
        self.prev_R = None if d["prev_R"] is None else d["prev_R"].to(dev)
        self.epoch, self.stage, self.batch_pos, self.done = d["epoch"], d["stage"], d["batch_pos"], d["done"]
        self.trial = int(d.get("trial", 0))
        self.acc = dict(d["acc"])
        self.acc.setdefault("sources", [0, 0, 0, 0])
        self.history = d["history"]
        _set_rng_state(d["rng"])


def _opt_to_cpu(sd: dict) -> dict:
    return {"state": {k: {kk: (vv.cpu() if isinstance(vv, Tensor) else vv) for kk, vv in v.items()}
                      for k, v in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def run_abinit(images, apix_work, ctf, config: AbinitConfig, device="cpu", should_stop=None, on_epoch_end=None,
               state: dict | None = None, progress: bool = False) -> AbinitEngine:
    """Build an engine (optionally from a checkpoint ``state``), run it and return it."""
    eng = AbinitEngine(images, apix_work, ctf, config, device, progress)
    if state is not None:
        eng.load_state_dict(state)
    eng.run(should_stop, on_epoch_end)
    return eng
