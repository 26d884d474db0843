"""One ``cryospin abinit`` run, from the input file to the final outputs.

Steps: check every input at once (the same checks as ``--dry-run``), write the
effective ``config.yaml``, build the working-box image cache, build the engine
(or continue it from ``checkpoint.pt``), train with checkpoints and a stop on
SIGINT/SIGTERM, then write the outputs (lifecycle/outputs.py) and the summary.

Exit codes: 0 done (or dry run), 2 bad input (InputError), 130 / 143 stopped by
SIGINT / SIGTERM after a checkpoint (rerun with ``--continue``).

Under ``torchrun`` (lifecycle/distributed.py) every rank checks the inputs and
trains its share (engine/distributed.py), then scores and backprojects its share
of the particles for the final maps; rank 0 alone creates the folder, builds the
image cache, logs, and writes checkpoints and outputs; the other ranks print only
errors.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryospin_relion import CITATION, __version__
from cryospin_relion.config import AbinitConfig
from cryospin_relion.errors import InputError
from cryospin_relion.io.atomic import write_json
from cryospin_relion.io.overwrite import same_file
from cryospin_relion.io.particles import ParticleTable
from cryospin_relion.lifecycle.checkpoint import (CHECKPOINT, TimedCheckpoints, checkpoint_exists, input_fingerprint,
                                                  load_for_resume, save_checkpoint)
from cryospin_relion.engine.distributed import ALONE, World
from cryospin_relion.lifecycle.console import close_log, open_log, rank_log, run_progress
from cryospin_relion.lifecycle.distributed import join_world, leave_world, rank_device
from cryospin_relion.lifecycle.outputs import (add_orientation_summary, final_table, output_files, write_final_outputs,
                                                write_report)
from cryospin_relion.lifecycle.pose_error import PoseErrorLog, load_true_rotations
from cryospin_relion.lifecycle.signals import StopOnSignal

STOP_POLL_BATCHES = 8  # with several ranks: batches between two agreed decisions to stop or checkpoint


@dataclass(frozen=True)
class AbinitRequest:
    """What the user asked for: the files and the run options outside the config."""

    input: Path
    output: Path
    config: AbinitConfig  # flags > --config YAML (or DIR/config.yaml when continuing) > defaults
    config_file: Path | None = None  # the YAML the config was read from (an input: never overwritten)
    resume: bool = False  # --continue
    datadir: str | None = None
    angpix: float | None = None
    dry_run: bool = False
    quiet: bool = False
    json_summary: Path | None = None
    true_poses: str | None = None


def run_abinit(req: AbinitRequest) -> int:
    """Run ``req``; returns the exit code (InputError propagates: exit 2).

    Every input is checked before anything is written: a refused run leaves no folder, no run.log."""
    plan = _check(req)
    plan = dataclasses.replace(plan, device=rank_device(plan.device))
    out = req.output
    had_config = (out / "config.yaml").is_file()  # before this run writes it
    world = join_world(plan.device)  # every rank has checked the inputs on its own
    try:
        if plan.config.schedule.batch_size < 2 * world.size:  # every rank needs a part of every batch
            raise InputError(f"--batch-size: {plan.config.schedule.batch_size} is less than 2 x the {world.size} "
                             "ranks (engine/distributed.py)")
        if world.is_main:
            log = _open_folder(out, req.quiet)
        else:
            log = rank_log(world.rank)
        world.barrier()  # the folder exists for every rank
        return _Run(req, log, world, had_config).execute(plan)
    finally:
        close_log()
        leave_world(world)


def _open_folder(out: Path, quiet: bool) -> logging.Logger:
    """Create the output folder and open its run.log (InputError when it cannot be written)."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: --o: cannot create the folder ({e.strerror or e})") from None
    try:
        log = open_log(out, quiet)
    except OSError as e:  # read-only mount, immutable folder: the permission bits did not tell
        if created:
            _remove_empty(out)
        raise InputError(f"{out}: --o: output folder is not writable ({e.strerror or e})") from None
    from cryospin_relion.io.atomic import remove_stale_temporaries

    remove_stale_temporaries(out)  # half-written files of a killed earlier run
    return log


@dataclass
class _Plan:
    """What the checks found: the particles, the effective config (with the working box), the device."""

    table: ParticleTable
    config: AbinitConfig
    device: torch.device
    warnings: tuple[str, ...] = ()  # one line each: validate.check_particles' and the working box's


def _check(req: AbinitRequest) -> _Plan:
    """Every check of the inputs and of the output folder, writing nothing."""
    from cryospin_relion.device import resolve_device
    from cryospin_relion.io.overwrite import refuse_overwriting
    from cryospin_relion.validate import check_particles, require_valid

    if not req.input.is_file():
        raise InputError(f"{req.input}: --i: file not found")
    out = req.output
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --o: exists and is not a folder")
    cfg = req.config
    device = resolve_device(cfg.run.device)
    table, problems = check_particles(req.input, out, datadir=req.datadir, angpix=req.angpix, no_ctf=cfg.data.no_ctf)
    table = require_valid(table, problems)
    warned = tuple(problems.warnings)  # logged as "warning: ..." once the run's log is open
    table = table.with_ctf_phase_flipped(cfg.data.ctf_phase_flipped)  # the engine's and the final maps' CTF
    box = cfg.data.working_box(int(table.box))
    if box < 8:
        raise InputError(f"{req.input}: image box {table.box} is too small (working box {box} < 8)")
    inputs = {"--i": [req.input], "--i (image stack)": sorted(set(map(str, table.stack_paths)))}
    if req.config_file is not None and not (req.resume and same_file(req.config_file, out / "config.yaml")):
        inputs["--config"] = [req.config_file]  # DIR/config.yaml with --continue is this run's own
    if req.true_poses:
        inputs["--true-poses"] = [req.true_poses]
    outputs = {"--o": [out / name for name in output_files(box, cfg.model.classes)]}
    if req.json_summary is not None:
        outputs["--json-summary"] = [req.json_summary]
    refuse_overwriting(outputs, inputs)
    if cfg.data.box is not None and cfg.data.box > box:
        warned += (f"--box {cfg.data.box} is larger than the images ({table.box} px): working box {box}",)
    return _Plan(table, cfg.with_box(box), device, warned)  # config.yaml records the effective working box


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


class _Run:
    """The state of one run between its steps (the engine, the checkpoint policy, the pose-error log)."""

    def __init__(self, req: AbinitRequest, log: logging.Logger, world: World = ALONE, had_config: bool = False):
        self.req, self.log, self.out = req, log, req.output
        self.world, self.had_config = world, had_config
        self.t_start = time.perf_counter()

    def execute(self, plan: _Plan) -> int:
        req, log, out = self.req, self.log, self.out
        cfg, table, device = plan.config, plan.table, plan.device
        log.info(f"cryospin {__version__} (cryospin_relion); please cite: {CITATION}")
        for w in plan.warnings:
            log.info(f"warning: {w}")
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        box = cfg.data.box
        self.warnings = plan.warnings  # logged above, and in the summary
        if self.world.is_main:
            cfg.to_yaml(out / "config.yaml")
        ranks = "" if self.world.alone else f", {self.world.size} ranks (data parallel)"
        log.info(f"cryospin abinit: {len(table)} particles from {req.input}, input box {table.box}, working box {box}, "
                 f"device {device}, threads {torch.get_num_threads()}{ranks}")
        log.info("effective config:\n" + cfg.to_yaml().rstrip())
        if req.dry_run:
            log.info("dry run: inputs checked, config written; not running")
            return 0
        return self._train_and_write(cfg, table, device, self.had_config)

    def _train_and_write(self, cfg: AbinitConfig, table, device, had_config: bool) -> int:
        from cryospin_relion.data.stack import build_cache
        from cryospin_relion.engine.run import AbinitEngine
        from cryospin_relion.geometry.ctf import CTF

        req, log, out, world = self.req, self.log, self.out, self.world
        main = world.is_main
        if main:  # the other ranks then find it built (its sidecar matches) and map it
            cache = build_cache(table, out, cfg.data.box, invert=cfg.data.invert, progress=not req.quiet)
        world.barrier()
        if not main:
            cache = build_cache(table, out, cfg.data.box, invert=cfg.data.invert, progress=False)
        apix_work = np.asarray(cache.apix, dtype=np.float64)
        use_ctf = not (cfg.data.no_ctf or table.ctf is None)
        from cryospin_relion.lifecycle.symmetry import volume_constraint

        constraint = volume_constraint(cfg.run.sym, cfg.run.sym_mode)  # --sym-mode impose: a symmetric volume
        if constraint is not None:
            log.info(f"--sym {cfg.run.sym} --sym-mode impose: the volume is kept {cfg.run.sym}-symmetric in RELION's "
                     f"frame after every step ({len(constraint.operators)} operators)")
        engine = AbinitEngine(cache.images, torch.as_tensor(apix_work, dtype=torch.float32),
                              CTF.from_arrays(table.ctf) if use_ctf else None, cfg, device,
                              progress=None if req.quiet or not main else run_progress(log), world=world,
                              volume_constraint=constraint)
        self.engine = engine
        self.ckpt = out / CHECKPOINT
        self.fingerprint = input_fingerprint(req.input, len(table))
        self.pose_log = (PoseErrorLog(load_true_rotations(req.true_poses, table)) if req.true_poses and main
                         else None)
        self._resume(cfg, had_config)

        timed = TimedCheckpoints(cfg.run.checkpoint_minutes)
        live = self._live_report(cfg, table)

        def checkpoint() -> None:  # on every rank at once (the engine merges the ranks' rows)
            engine.sync()
            if main:
                save_checkpoint(self.ckpt, engine.state_dict(), self.fingerprint,
                                None if self.pose_log is None else self.pose_log.state_dict())
            timed.saved()

        def on_epoch_end(eng) -> None:
            checkpoint()
            if not main:
                return
            if self.pose_log is not None:
                self.pose_log.record(eng)
            hist = self.history_json()
            write_json(out / "history.json", hist)
            live.epoch_end(eng, hist, "running")

        polls = itertools.count()

        with StopOnSignal(log) as stop:
            def after_batch() -> bool:
                """Polled after every batch (a consistent state): timed checkpoints, stop requests. Several ranks
                must agree (a collective, whose result the host reads: it waits for the GPU), so they decide at
                every ``STOP_POLL_BATCHES``-th poll only; every rank polls at the same batches."""
                if not world.alone and next(polls) % STOP_POLL_BATCHES:
                    return False
                due, stopping = world.any(timed.due() and engine.resumable, stop.requested)  # all ranks agree
                if due:
                    checkpoint()
                return stopping

            status = engine.run(should_stop=after_batch, on_epoch_end=on_epoch_end,
                                on_trial_epoch_end=None if self.pose_log is None else self.pose_log.record)
        if status == "stopped":
            checkpoint()
            if not main:
                return stop.exit_code
            hist = self.history_json()
            write_json(out / "history.json", hist)
            epoch, _, batch = engine.position
            live.write(engine, hist, f"stopped at epoch {epoch + 1}, batch {batch} (rerun with --continue)")
            log.info(f"stopped at epoch {epoch + 1}, batch {batch}; checkpoint written to {self.ckpt}; "
                     f"rerun with --continue to resume")
            return stop.exit_code
        t_train = time.perf_counter() - self.t_start

        from cryospin_relion.lifecycle.scores import compute_scores

        # every rank scores and backprojects its share of the particles; rank 0 writes
        scores = compute_scores(engine, log)  # per-particle pose confidence and loss (lifecycle/scores.py)
        n_classes = cfg.model.classes
        classes = decoders = None
        if n_classes > 1:  # each class's maps from its own particles, in class001/ ... (lifecycle/outputs.py)
            classes = engine.final_classes()
            decoders = [m.numpy() for m in engine.decoder_maps()]
        result = write_final_outputs(out, table, cache.images, apix_work, engine.final_poses(),
                                     engine.decoder_map().numpy(), flip_hand=cfg.run.flip_hand, seed=cfg.run.seed,
                                     use_ctf=use_ctf, write_cs=req.input.suffix.lower() == ".cs", device=device,
                                     progress=not req.quiet, log=log, mw_kda=cfg.data.mw_kda, scores=scores,
                                     sym=cfg.run.sym, world=world, sym_mode=cfg.run.sym_mode, n_classes=n_classes,
                                     classes=classes, decoders=decoders)
        if not main:
            return 0
        hist = self.history_json(final_resolution_A=result.resolution_A if np.isfinite(result.resolution_A) else None)
        write_json(out / "history.json", hist)
        total = time.perf_counter() - self.t_start
        largest = "" if result.classes is None else ", largest class"
        log.info(f"half-map FSC 0.143 resolution {result.resolution_A:.2f} A{largest} (Nyquist "
                 f"{2 * result.apix:.2f} A; halves share one ab-initio run, so this is optimistic); training "
                 f"{t_train:.0f} s, total {total:.0f} s")
        h = engine.history
        summary = {
            "input": str(req.input), "output": str(out), "n_particles": len(table), "box": result.box,
            "apix": result.apix, "resolution_A": result.resolution_A, "switch_epoch": h.switch_epoch,
            "epochs": len(h), "final_loss": h.last.loss if h.last else None, "train_s": t_train, "total_s": total,
            **h.stage_seconds(), "final_outputs_s": total - t_train, "device": str(device),
            "outputs": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
        }
        if result.classes is not None:  # K > 1: resolution_A is the largest class's (null when no class has maps)
            summary["classes"] = [c.summary() for c in result.classes]
            if not np.isfinite(result.resolution_A):
                summary["resolution_A"] = None
        if self.warnings:
            summary["warnings"] = list(self.warnings)
        add_orientation_summary(summary, result, log)
        if scores is not None:
            summary.update(scores.summary())
        write_report(out, result, hist, summary, log)
        if req.json_summary:
            write_json(Path(req.json_summary), summary)
        if not req.quiet:
            print(final_table(summary, out))
        return 0

    def _live_report(self, cfg: AbinitConfig, table):
        """logfile.pdf during the run (lifecycle/live_report.py), at the working box's voxel size."""
        from cryospin_relion.halfmaps import output_apix
        from cryospin_relion.lifecycle.live_report import LiveReport

        try:
            apix = output_apix(table, cfg.data.box, cfg.data.box)
        except InputError:  # mixed pixel sizes: the final outputs say so; the live report goes without
            apix = None
        return LiveReport(self.out, apix, self.log, flip_hand=cfg.run.flip_hand)

    def _resume(self, cfg: AbinitConfig, had_config: bool) -> None:
        req, log, engine = self.req, self.log, self.engine
        if not req.resume:
            return
        if not checkpoint_exists(self.ckpt) and had_config:
            # killed before its first checkpoint (e.g. during the stage-1 starts): nothing to lose
            log.info(f"--continue: no checkpoint yet in {self.out}; starting from the beginning")
            return
        state = load_for_resume(self.ckpt, cfg, self.fingerprint, log)
        try:
            engine.load_state_dict(state["engine"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise InputError(f"{self.ckpt}: --continue: checkpoint does not match this run ({e})") from None
        if self.pose_log is not None and state.get("pose_error"):
            self.pose_log.load_state_dict(state["pose_error"])
        epoch, stage, batch = engine.position
        log.info(f"resuming at epoch {epoch + 1} (stage {stage}, batch {batch})")

    def history_json(self, **extra) -> dict:
        """history.json: the engine's per-epoch record (engine/history.py), the pose errors, and ``extra``."""
        h = self.engine.history.to_json()
        if self.pose_log is not None:
            h["pose_error"] = self.pose_log.to_json(self.engine)
        return h | extra
