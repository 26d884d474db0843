"""Ab-initio reconstruction with cryoSPIN (semi-amortized pose inference).

Examples:
  cryospin abinit --i Extract/job005/particles.star --o abinit
  cryospin abinit --i J12_particles.cs --o abinit --box 64 --heads 7 --device cuda
  cryospin abinit --i particles.star --o abinit --continue        # resume after a stop

Stage 1 trains a multi-head image encoder and a Hartley-space volume (auto-encoding,
winner takes all over the heads); stage 2 optimises every particle's pose directly
(auto-decoding), starting from its winning head. Images are Fourier-cropped to the
working box (--box, default min(input box, 64)).

Outputs in DIR: half1_map.mrc, half2_map.mrc (backprojections of the two random
halves with the final poses; both halves come from ONE ab-initio run, so they are
not independent refinements and their FSC is optimistic), map.mrc (all particles,
low-pass filtered at the 0.143 resolution, for use as a RELION initial model with
--ini_high; these three maps are at the particles' box and pixel size, as RELION
and cryoSPARC refinement need), decoder_map.mrc (the learned volume, at the working
box), fsc.txt, particles.star (RELION
3.1+, every input column kept, new angles/origins/rlnRandomSubset), particles.cs
(for .cs input), config.yaml (effective config), run.log, history.json,
checkpoint.pt (after every epoch), logfile.pdf (when the report module is present).

Options precedence: command-line flags > --config YAML > built-in defaults.
Exit codes: 0 success, 1 internal failure, 2 bad input, 130/143 stopped by
SIGINT/SIGTERM (a checkpoint is written; rerun with --continue).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryospin_relion.config import AbinitConfig
from cryospin_relion.errors import InputError

CHECKPOINT = "checkpoint.pt"
LOGGER = "cryospin.abinit"

# flag name on the command line -> config field
_FLAG_FIELDS = {
    "box": "box", "heads": "heads", "epochs_amortized": "epochs_amortized", "epochs_autodecode": "epochs_autodecode",
    "device": "device", "j": "threads", "seed": "seed", "max_shift": "max_shift", "batch_size": "batch_size",
    "preset": "preset", "loss": "loss", "min_epochs_amortized": "min_epochs_amortized",
    "switch_threshold": "switch_threshold_deg", "explore_candidates": "explore_candidates",
    "explore_top": "explore_top", "explore_rounds": "explore_rounds", "explore_local": "explore_local",
    "explore_local_deg": "explore_local_deg", "explore_shift": "explore_shift_px",
    "distill_weight": "distill_weight", "lr_decoder_decay": "lr_decoder_decay",
    "stage1_particles": "stage1_particles", "stage1_trials": "stage1_trials",
    "stage1_trial_epochs": "stage1_trial_epochs", "stage1_max_crop": "stage1_max_crop",
    "explore_grid_crop": "explore_grid_crop", "explore_shift_range": "explore_shift_range",
    "explore_shift_step": "explore_shift_step",
}
_BOOL_FIELDS = {"no_ctf": "no_ctf", "invert": "invert", "flip_hand": "flip_hand"}
# flags that set a config field to False
_OFF_FIELDS = {"no_auto_switch": "auto_switch", "no_coarse_to_fine": "coarse_to_fine"}


def add_args(p: argparse.ArgumentParser) -> None:
    d = AbinitConfig()
    p.add_argument("--i", required=True, metavar="IN", help="particles (.star or .cs)")
    p.add_argument("--o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="YAML", help="configuration file (any AbinitConfig field)")
    p.add_argument("--box", type=int, help=f"working box in pixels, even (default min(input box, {d.max_box}))")
    p.add_argument("--heads", type=int, help=f"pose heads M (default {d.heads})")
    p.add_argument("--epochs-amortized", type=int, help=f"max stage-1 epochs (default {d.epochs_amortized})")
    p.add_argument("--epochs-autodecode", type=int, help=f"stage-2 epochs (default {d.epochs_autodecode})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="compute device (default auto)")
    p.add_argument("--j", type=int, metavar="N", help="CPU threads (default: torch's default)")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--continue", dest="cont", action="store_true", help="resume from DIR/checkpoint.pt")
    p.add_argument("--max-shift", type=float, metavar="PX", help="shift bound, working-box pixels (default 0.1 box)")
    p.add_argument("--batch-size", type=int, metavar="B", help=f"batch size (default {d.batch_size})")
    p.add_argument("--preset", choices=("fast", "paper"), help=f"encoder size (default {d.preset})")
    p.add_argument("--loss", choices=("l1", "l2"), help=f"reconstruction loss (default {d.loss})")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    p.add_argument("--invert", action="store_true", help="invert the image contrast (protein black -> white)")
    p.add_argument("--datadir", metavar="D", help="extra folder to search for image stacks")
    p.add_argument("--angpix", type=float, metavar="A", help="pixel size when the file has none")
    p.add_argument("--flip-hand", action="store_true", help="mirror the result (maps and poses)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log lines")
    p.add_argument("--json-summary", metavar="FILE", help="write a JSON summary of the run")
    p.add_argument("--true-poses", default=None, metavar="STAR",
                   help="ground-truth poses (.star/.cs of the same particles, e.g. from cryospin simulate): "
                        "pose error per epoch in history.json and logfile.pdf")
    p.add_argument("--dry-run", action="store_true", help="check inputs, write config.yaml, do not run")

    g = p.add_argument_group("schedule")
    g.add_argument("--min-epochs-amortized", type=int, metavar="E",
                   help=f"stage 1 lasts at least this many epochs (default {d.min_epochs_amortized})")
    g.add_argument("--no-auto-switch", action="store_true",
                   help="run all --epochs-amortized epochs of stage 1 (no early switch)")
    g.add_argument("--switch-threshold", type=float, metavar="DEG",
                   help="auto-switch once the median change of the winning pose between epochs is below "
                        f"this (default {d.switch_threshold_deg})")
    g.add_argument("--no-coarse-to-fine", action="store_true", help="work at the full working box from the start")
    g.add_argument("--stage1-particles", type=int, metavar="N",
                   help=f"stage 1 trains on a random subset of N particles, 0 = all (default {d.stage1_particles})")
    g.add_argument("--stage1-trials", type=int, metavar="K",
                   help=f"independent starts of stage 1; the lowest-loss one continues (default {d.stage1_trials})")
    g.add_argument("--stage1-trial-epochs", type=int, metavar="E",
                   help=f"epochs of each start before choosing (default {d.stage1_trial_epochs})")
    g.add_argument("--stage1-max-crop", type=int, metavar="PX",
                   help=f"largest Fourier box of stage 1, 0 = the working box (default {d.stage1_max_crop})")

    g = p.add_argument_group("stage-1 pose search (beyond the reference; docs/method.md)")
    g.add_argument("--explore-candidates", type=int, metavar="N",
                   help=f"global rotation candidates per image, 0 = the reference winner-takes-all over the "
                        f"heads only (default {d.explore_candidates})")
    g.add_argument("--explore-grid-crop", type=int, metavar="PX",
                   help=f"Fourier box of the global scan, 0 = the epoch's (default {d.explore_grid_crop})")
    g.add_argument("--explore-shift-range", type=float, metavar="F",
                   help=f"the global scan tries shifts out to +- F x working box around the remembered shift "
                        f"(default {d.explore_shift_range})")
    g.add_argument("--explore-shift-step", type=float, metavar="PX",
                   help=f"step of that shift grid, working-box px (default {d.explore_shift_step})")
    g.add_argument("--explore-top", type=int, metavar="K",
                   help=f"best global candidates re-scored with the loss (default {d.explore_top})")
    g.add_argument("--explore-rounds", type=int, metavar="R",
                   help=f"local refinement rounds (default {d.explore_rounds})")
    g.add_argument("--explore-local", type=int, metavar="L",
                   help=f"perturbations of the current best per round (default {d.explore_local})")
    g.add_argument("--explore-local-deg", type=float, metavar="DEG",
                   help=f"RMS angle of the first round's perturbations (default {d.explore_local_deg})")
    g.add_argument("--explore-shift", type=float, metavar="PX",
                   help=f"RMS shift jitter of the first round, working-box px (default {d.explore_shift_px})")
    g.add_argument("--distill-weight", type=float, metavar="W",
                   help=f"weight of the head-to-winner distillation term (default {d.distill_weight})")
    g.add_argument("--lr-decoder-decay", type=float, metavar="F",
                   help=f"stage-1 volume learning-rate factor per epoch (default {d.lr_decoder_decay})")


def effective_config(args: argparse.Namespace, out_dir: Path) -> AbinitConfig:
    """defaults < (DIR/config.yaml when continuing without --config) < --config YAML < flags."""
    if args.config:
        cfg = AbinitConfig.from_yaml(args.config)
    elif getattr(args, "cont", False) and (out_dir / "config.yaml").is_file():
        cfg = AbinitConfig.from_yaml(out_dir / "config.yaml")
    else:
        cfg = AbinitConfig()
    kw = {field: getattr(args, flag, None) for flag, field in _FLAG_FIELDS.items()}
    kw.update({field: True for flag, field in _BOOL_FIELDS.items() if getattr(args, flag, False)})
    kw.update({field: False for flag, field in _OFF_FIELDS.items() if getattr(args, flag, False)})
    return cfg.override(**kw)


def _setup_logging(out_dir: Path, quiet: bool) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(out_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(fh)
    if not quiet:
        ch = logging.StreamHandler(sys.stdout)
        ch.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(ch)
    return log


def _close_logging() -> None:
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def _save_torch(obj, path: Path) -> None:
    from cryospin_relion.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_json(obj, path: Path) -> None:
    from cryospin_relion.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1, default=float))


def lowpass(vol: np.ndarray, res_A: float, apix: float, width_shells: float = 2.0) -> np.ndarray:
    """Low-pass filter a map at ``res_A`` with a raised-cosine edge ``width_shells`` wide."""
    from cryospin_relion.geometry.fourier import fft3_centered, ifft3_centered, radius_grid_3d

    n = vol.shape[-1]
    v = torch.as_tensor(vol, dtype=torch.float64)
    r = radius_grid_3d(n, dtype=torch.float64)
    cut = n * apix / max(res_A, 2 * apix)
    edge = ((r - cut) / width_shells).clamp(0, 1)
    filt = 0.5 * (1 + torch.cos(math.pi * edge))
    return ifft3_centered(fft3_centered(v) * filt).real.float().numpy()


# config fields that may change between a checkpoint and --continue (schedule length, hardware)
RESUMABLE_CHANGES = {"epochs_amortized", "epochs_autodecode", "device", "threads", "flip_hand", "checkpoint_minutes"}


def input_fingerprint(inp: Path, table) -> dict:
    """What identifies the input of a run: the file (path, size, mtime) and the particle count."""
    st = inp.stat()
    return {"file": str(inp.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "n": len(table)}


def resume_mismatch(state: dict, cfg: AbinitConfig, fingerprint: dict) -> str:
    """'' when a checkpoint may be continued with this config and input, else what changed."""
    old_cfg = state.get("config", {})
    diff = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and k in old_cfg and old_cfg[k] != v)
    old_in = state.get("input")
    if old_in is not None and old_in != fingerprint:
        diff.append("input particles (" + ", ".join(k for k in fingerprint if old_in.get(k) != fingerprint[k]) + ")")
    return ", ".join(f"config {k}" if not k.startswith("input") else k for k in diff)


def load_true_rotations(path: str, table) -> np.ndarray:
    """Ground-truth RELION matrices (N, 3, 3) for the particles of ``table``, in the same order."""
    from cryospin_relion.io.read import read_particles

    true = read_particles(path, no_ctf=True, check_stacks=False)
    if true.rotations is None:
        raise InputError(f"{path}: rlnAngleRot: --true-poses has no poses")
    if len(true) != len(table):
        raise InputError(f"{path}: --true-poses: {len(true)} particles, the input has {len(table)}")
    return true.rotations


def record_pose_error(eng, truth: np.ndarray, max_n: int = 2000) -> None:
    """Median/mean rotation error (deg, after the best global alignment incl. mirror) into eng.history."""
    from cryospin_relion.evaluate.pose_error import pose_errors

    R, _ = eng.final_poses()
    rows = eng.pose_rows().numpy()  # in stage 1 only the subset's poses are estimates
    idx = rows[np.linspace(0, len(rows) - 1, min(len(rows), max_n)).astype(np.int64)]
    e = pose_errors(truth[idx], R[idx])["rotation_error_deg"]
    pe = eng.history.setdefault("pose_error", {"epoch": [], "median_deg": [], "mean_deg": [], "stage": []})
    if pe["epoch"] and pe["epoch"][-1] == eng.history["epoch"][-1]:
        return  # already recorded (the last epoch of the chosen stage-1 start)
    pe["epoch"].append(eng.history["epoch"][-1])
    pe["stage"].append(eng.history["stage"][-1])
    pe["median_deg"].append(float(e["median"]))
    pe["mean_deg"].append(float(e["mean"]))


def to_particle_box(vol: np.ndarray, box: int) -> np.ndarray:
    """Resample a working-box map (n, n, n) to the particle box by Fourier padding (identity when n == box)."""
    from cryospin_relion.geometry.fourier import fourier_crop_3d

    return fourier_crop_3d(torch.as_tensor(np.ascontiguousarray(vol)), box).numpy().astype(np.float32)


def main(args: argparse.Namespace) -> int:
    out = Path(args.o)
    inp = Path(args.i)
    if not inp.is_file():
        raise InputError(f"{inp}: --i: file not found")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --o: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: --o: cannot create the folder ({e.strerror or e})") from None
    from cryospin_relion.io.atomic import remove_stale_temporaries

    remove_stale_temporaries(out)  # half-written files of a killed earlier run
    cfg = effective_config(args, out)
    log = _setup_logging(out, args.quiet)
    try:
        return _run(args, cfg, inp, out, log)
    finally:
        _close_logging()


def _run(args, cfg: AbinitConfig, inp: Path, out: Path, log: logging.Logger) -> int:
    from cryospin_relion.data.stack import build_cache
    from cryospin_relion.engine.run import AbinitEngine, resolve_device
    from cryospin_relion.validate import check_particles, require_valid

    t_start = time.perf_counter()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # every input problem at once (the same checks as --dry-run), before any work
    table = require_valid(*check_particles(inp, out, datadir=args.datadir, angpix=args.angpix, no_ctf=cfg.no_ctf))
    box = cfg.working_box(int(table.box))
    if box < 8:
        raise InputError(f"{inp}: image box {table.box} is too small (working box {box} < 8)")
    cfg.box = box  # record the effective working box
    had_config = (out / "config.yaml").is_file()
    cfg.to_yaml(out / "config.yaml")
    log.info(f"cryospin abinit: {len(table)} particles from {inp}, input box {table.box}, working box {box}, "
             f"device {device}, threads {torch.get_num_threads()}")
    log.info("effective config:\n" + cfg.to_yaml().rstrip())
    if args.dry_run:
        log.info("dry run: inputs checked, config written; not running")
        return 0

    cache = build_cache(table, out, box, invert=cfg.invert, progress=not args.quiet)
    apix_work = np.asarray(cache.apix, dtype=np.float64)
    ctf = None if (cfg.no_ctf or table.ctf is None) else {
        k: torch.tensor(np.array(v, dtype=np.float32)) for k, v in table.ctf.as_dict().items()}
    engine = AbinitEngine(cache.images, torch.as_tensor(apix_work, dtype=torch.float32), ctf, cfg, device,
                          progress=not args.quiet)
    ckpt = out / CHECKPOINT
    fingerprint = input_fingerprint(inp, table)
    if args.cont and not ckpt.is_file() and had_config:
        # killed before its first checkpoint (e.g. during the stage-1 starts): nothing to lose
        log.info(f"--continue: no checkpoint yet in {out}; starting from the beginning")
    elif args.cont:
        if not ckpt.is_file():
            raise InputError(f"{ckpt}: --continue: no checkpoint in the output folder")
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            changed = resume_mismatch(state, cfg, fingerprint)
            if changed:
                raise InputError(f"{ckpt}: --continue: {changed} changed since the checkpoint; rerun without "
                                 f"--continue in a new folder, or restore them")
            engine.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise InputError(f"{ckpt}: --continue: checkpoint does not match this run ({e})") from None
        log.info(f"resuming at epoch {engine.epoch + 1} (stage {engine.stage}, batch {engine.batch_pos})")

    stop = {"sig": None}

    def handler(signum, frame):
        if stop["sig"] is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        stop["sig"] = signum
        log.info(f"received {signal.Signals(signum).name}: finishing the current batch, then checkpointing")

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, handler)
    except ValueError:  # not the main thread
        old = {}

    last_save = [time.monotonic()]  # when the newest checkpoint was written

    def checkpoint(eng) -> None:
        _save_torch(dict(eng.state_dict(), input=fingerprint), ckpt)
        last_save[0] = time.monotonic()

    truth = load_true_rotations(args.true_poses, table) if args.true_poses else None

    def on_epoch_end(eng) -> None:
        checkpoint(eng)
        if truth is not None:
            record_pose_error(eng, truth)
        _save_json(eng.history, out / "history.json")

    def after_batch() -> bool:
        """Polled by the engine after every batch (a consistent state): timed checkpoints, stop requests."""
        if (cfg.checkpoint_minutes > 0 and time.monotonic() - last_save[0] > 60 * cfg.checkpoint_minutes
                and not engine.in_trials):  # a start of stage 1 is not resumable mid-way
            checkpoint(engine)
        return stop["sig"] is not None

    try:
        status = engine.run(should_stop=after_batch, on_epoch_end=on_epoch_end,
                            on_trial_epoch_end=(lambda eng: record_pose_error(eng, truth)) if truth is not None else None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if status == "stopped":
        checkpoint(engine)
        _save_json(engine.history, out / "history.json")
        code = 143 if stop["sig"] == signal.SIGTERM else 130
        log.info(f"stopped at epoch {engine.epoch + 1}, batch {engine.batch_pos}; checkpoint written to {ckpt}; "
                 f"rerun with --continue to resume")
        return code
    t_train = time.perf_counter() - t_start

    # -- final outputs ----------------------------------------------------------------------
    from cryospin_relion.commands.reconstruct import write_fsc
    from cryospin_relion.evaluate.align import flip_poses_hand, flip_volume_hand
    from cryospin_relion.io.mrc import write_mrc
    from cryospin_relion.io.read import write_particles
    from cryospin_relion.reconstruct import output_apix, reconstruct_halves

    R, t_px = engine.final_poses()
    decoder = engine.decoder_map().numpy()
    if cfg.flip_hand:
        R = flip_poses_hand(R)
        decoder = flip_volume_hand(decoder)
    shifts_A = -t_px * apix_work[:, None]  # RELION origin = - content translation * pixel size
    halves = table.halves(cfg.seed)
    log.info("backprojecting the two halves with the final poses")
    hm = reconstruct_halves(cache.images, table, rotations=R, shifts_A=shifts_A, halves=halves,
                            use_ctf=ctf is not None, device=device, seed=cfg.seed, progress=not args.quiet)
    apix_out = float(output_apix(table, box, box))
    res = float(hm.resolution)
    # maps for the next step at the particles' box and pixel size (RELION refine and cryoSPARC
    # refuse a reference of another size): Fourier padding adds no information, it only resamples
    pbox, papix = int(table.box), float(output_apix(table, int(table.box), int(table.box)))
    write_mrc(out / "half1_map.mrc", to_particle_box(hm.half1, pbox), papix)
    write_mrc(out / "half2_map.mrc", to_particle_box(hm.half2, pbox), papix)
    write_mrc(out / "map.mrc", to_particle_box(lowpass(hm.map, res, apix_out), pbox), papix)
    write_mrc(out / "decoder_map.mrc", decoder, apix_out)  # the learned volume, at the working box
    write_fsc(out / "fsc.txt", hm.fsc, box, apix_out)
    new = table.with_poses(R, shifts_A, halves)
    write_particles(new, out / "particles.star")
    if inp.suffix.lower() == ".cs":
        write_particles(new, out / "particles.cs")
    h = engine.history
    h["final_resolution_A"] = res
    _save_json(h, out / "history.json")
    total = time.perf_counter() - t_start
    log.info(f"half-map FSC 0.143 resolution {res:.2f} A (Nyquist {2 * apix_out:.2f} A; halves share one "
             f"ab-initio run, so this is optimistic); training {t_train:.0f} s, total {total:.0f} s")
    summary = {
        "input": str(inp), "output": str(out), "n_particles": len(table), "box": box, "apix": apix_out,
        "resolution_A": res, "switch_epoch": h.get("switch_epoch"), "epochs": len(h["epoch"]),
        "final_loss": h["loss"][-1] if h["loss"] else None, "train_s": t_train, "total_s": total,
        **stage_times(h), "final_outputs_s": total - t_train,
        "device": str(device), "outputs": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
    }
    try:
        from cryospin_relion.report import make_report
    except ImportError:  # report module not installed / not landed
        make_report = None
    if make_report is not None:
        try:
            make_report(out, fsc=hm.fsc, fsc_resolution_A=res, apix=apix_out, box=box, history=h, rotations=R,
                        volume=hm.map, summary=summary, pose_error_history=h.get("pose_error"))
        except Exception as e:  # the report must never fail the run
            log.info(f"report not written: {type(e).__name__}: {e}")
    if args.json_summary:
        _save_json(summary, Path(args.json_summary))
    if not args.quiet:
        print(final_table(summary, out))
    return 0


def stage_times(history: dict) -> dict:
    """Seconds of training spent in stage 1 and in stage 2, from the per-epoch history."""
    t = {1: 0.0, 2: 0.0}
    for stage, dt in zip(history.get("stage", []), history.get("epoch_time_s", [])):
        t[int(stage)] = t.get(int(stage), 0.0) + float(dt or 0.0)
    t[1] += float(history.get("trials", {}).get("dropped_s", 0.0))  # the stage-1 starts that were dropped
    return {"stage1_s": t[1], "stage2_s": t[2]}


def final_table(summary: dict, out: Path) -> str:
    """The short table printed at the end of a run."""
    rows = [
        ("resolution (FSC 0.143, half maps)", f"{summary['resolution_A']:.2f} A  (Nyquist {2 * summary['apix']:.2f} A)"),
        ("particles used", f"{summary['n_particles']}"),
        ("stage 1 (auto-encoding)", f"{summary['stage1_s']:.0f} s"),
        ("stage 2 (auto-decoding)", f"{summary['stage2_s']:.0f} s"),
        ("maps, FSC, pose files", f"{summary['final_outputs_s']:.0f} s"),
        ("map / half maps", f"{out / 'map.mrc'}  {out / 'half1_map.mrc'}  {out / 'half2_map.mrc'}"),
        ("poses", "  ".join(str(out / n) for n in ("particles.star", "particles.cs") if (out / n).is_file())),
        ("report", str(out / "logfile.pdf")),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["", "cryospin abinit finished", *(f"  {k:<{w}}  {v}" for k, v in rows)])
