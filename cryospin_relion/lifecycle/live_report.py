"""``logfile.pdf`` and the PNGs while a run goes, and again from a run's folder.

- :class:`LiveReport`: after an epoch (when at least :func:`report_interval` seconds have
  passed since the last report, or since the run started: a run of a few seconds makes only
  its final report) and when a run
  stops, the report is rewritten from the engine's current state: the loss history, the
  central slices of the current volume (``engine.decoder_map()``, working box) and the view
  directions of the current poses of the estimated rows. Making it takes a few seconds on
  the CPU (matplotlib), so the wait is also at least 10 times the last report's time (reports
  take at most about a tenth of a run). A failure is logged once and never fails the run.
  The final report (outputs.py ``write_report``) replaces it at the end.
- :func:`report_from_folder`: ``cryospin report DIR`` -- the report again from the files of
  a finished or running run (history.json, map.mrc or decoder_map.mrc, fsc.txt,
  particles.star), reading nothing else.

Every file is written atomically (report/pdf.py), so RELION's GUI never sees a half-written PDF.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from cryospin_relion.errors import InputError

#: seconds between two reports during a run (after an epoch); env CRYOSPIN_REPORT_INTERVAL_S overrides
REPORT_INTERVAL_S = 30.0
INTERVAL_ENV = "CRYOSPIN_REPORT_INTERVAL_S"


def report_interval() -> float:
    """:data:`REPORT_INTERVAL_S`, or the environment's ``CRYOSPIN_REPORT_INTERVAL_S`` (seconds, >= 0)."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return REPORT_INTERVAL_S
    try:
        v = float(raw)
    except ValueError:
        return REPORT_INTERVAL_S
    return v if math.isfinite(v) and v >= 0 else REPORT_INTERVAL_S


class LiveReport:
    """The report of a running run, rewritten at most every ``interval`` seconds.

    Args:
        out: the run's folder.
        apix: voxel size (A) of the engine's volume (working box).
        log: the run's logger (a failure is logged once).
        flip_hand: show the volume and poses with the hand flipped (as the final outputs are).
        interval: seconds between reports (default :func:`report_interval`).
    """

    def __init__(self, out: Path, apix: float | None, log: logging.Logger, *, flip_hand: bool = False,
                 interval: float | None = None):
        self.out, self.log, self.flip_hand = Path(out), log, flip_hand
        self.apix = None if apix is None else float(apix)
        self.interval = report_interval() if interval is None else float(interval)
        self.last = time.perf_counter()  # the end of the last report; the run's start before the first
        self.failed = False
        self.seconds: list[float] = []  # time of each report (for the log / tests)

    def due(self) -> bool:
        """True once ``interval`` seconds have passed since the last report or the start (and at least 10
        times what the last one took, so that reports never take more than a tenth of a run)."""
        wait = self.interval if self.interval == 0 or not self.seconds else max(self.interval, 10 * self.seconds[-1])
        return time.perf_counter() - self.last >= wait

    def epoch_end(self, engine, history: dict, status: str) -> None:
        """After an epoch: the report, if due."""
        if self.due():
            self.write(engine, history, status)

    def write(self, engine, history: dict, status: str) -> None:
        """The report now, from ``engine`` and the ``history.json`` dict; never raises."""
        t0 = time.perf_counter()
        try:
            self._write(engine, history, status)
        except Exception as e:  # the report must never fail the run
            if not self.failed:
                self.log.info(f"report not written (the run goes on): {type(e).__name__}: {e}")
            self.failed = True
        finally:
            self.last = time.perf_counter()
            self.seconds.append(self.last - t0)

    def _write(self, engine, history: dict, status: str) -> None:
        from cryospin_relion.geometry.hand import flip_poses_hand, flip_volume_hand
        from cryospin_relion.report import make_report

        volume = engine.decoder_map().numpy()
        rows = np.asarray(engine.estimated_rows().cpu().numpy(), dtype=np.int64)
        rotations = engine.final_poses()[0][rows]
        if self.flip_hand:
            volume, rotations = flip_volume_hand(volume), flip_poses_hand(rotations)
        epoch, stage, _ = engine.position
        loss = history.get("loss") or []
        summary = {
            "status": status, "output": str(self.out), "epochs done": epoch, "stage": stage,
            "last loss": loss[-1] if loss else None, "poses shown": f"{len(rows)} particles (current estimates)",
            "map shown": "current learned volume (decoder), working box",
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        make_report(self.out, apix=self.apix, box=int(volume.shape[-1]), history=history, rotations=rotations,
                    volume=volume, summary=summary, pose_error_history=history.get("pose_error"))


# -- cryospin report DIR -----------------------------------------------------------------


def _read(path: Path, what: str, reader):
    try:
        return reader(path)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def report_from_folder(folder: str | os.PathLike) -> dict[str, Path]:
    """Rewrite ``logfile.pdf`` and the PNGs of the run in ``folder`` from its files alone.

    Reads history.json (required), fsc.txt, map.mrc (else decoder_map.mrc) and particles.star (poses,
    and the score page when it has the scores) when present. Returns make_report's {key: path}. Raises InputError for a folder without a readable
    history.json or with an unreadable file."""
    from cryospin_relion.io.fsc_table import read_fsc
    from cryospin_relion.io.mrc import read_mrc
    from cryospin_relion.io.read import read_particles
    from cryospin_relion.report import make_report

    out = Path(folder)
    if not out.is_dir():
        raise InputError(f"{out}: not a folder")
    hpath = out / "history.json"
    if not hpath.is_file():
        raise InputError(f"{out}: no history.json (not a cryospin abinit output folder, or no epoch done yet)")
    history = _read(hpath, "the history", lambda p: json.loads(p.read_text()))
    if not isinstance(history, dict):
        raise InputError(f"{hpath}: not a history.json (expected an object)")

    fsc = box = apix = None
    if (out / "fsc.txt").is_file():
        fsc, box, apix = _read(out / "fsc.txt", "the FSC table", read_fsc)
    volume, vol_name = None, None
    for name in ("map.mrc", "decoder_map.mrc"):
        if (out / name).is_file():
            volume, vapix = _read(out / name, "the map", read_mrc)
            if volume.ndim != 3:
                raise InputError(f"{out / name}: not a volume (shape {volume.shape})")
            vol_name = name
            if box is not None and volume.shape[-1] != box and len(set(volume.shape)) == 1:
                # map.mrc is at the particles' box: show it at fsc.txt's working box, as the run's report does
                from cryospin_relion.geometry.filters import resample_box

                volume = resample_box(volume, box)
            elif apix is None and vapix:
                apix = float(vapix)
            break
    rotations, n_particles, scores = None, None, None
    if (out / "particles.star").is_file():
        table = _read(out / "particles.star", "the particles",
                      lambda p: read_particles(p, check_stacks=False, no_ctf=True))
        n_particles = len(table)
        rotations = table.rotations
        if table.confidence is not None:  # the score page, as the run drew it (lifecycle/scores.py)
            from cryospin_relion.lifecycle.scores import suggest_cutoff

            scores = {"confidence": table.confidence, "cutoff": suggest_cutoff(table.confidence),
                      "loss": table.fit_loss}

    classes = _classes_from_folder(out, history)
    if classes:  # K > 1: every class's FSC curve, the largest class's map (as the run's report)
        curves = {f"class {c['class']}": c.pop("fsc") for c in classes if c.get("fsc") is not None}
        with_maps = [c for c in classes if c["map"] is not None]
        if curves:
            fsc, box, apix = curves, with_maps[0]["box"], with_maps[0]["apix"]
        if with_maps:
            largest = max(with_maps, key=lambda c: c["n_particles"])
            volume, vol_name = largest["map"], f"class{largest['class']:03d}/map.mrc"
    loss, times = history.get("loss") or [], history.get("time_s") or []
    finished = (((out / "map.mrc").is_file() or bool(classes)) and history.get("final_resolution_A") is not None)
    summary = {
        "status": "finished" if finished else "not finished (running or stopped)",
        "output": str(out),
        "resolution_A": history.get("final_resolution_A"),
        "n_particles": n_particles, "box": box, "apix": apix,
        "epochs": len(loss), "switch_epoch": history.get("switch_epoch"),
        "final_loss": loss[-1] if loss else None, "train_s": times[-1] if times else None,
        "map shown": vol_name, "report rebuilt": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    if not loss:
        raise InputError(f"{hpath}: no epoch recorded yet: nothing to report")
    return make_report(out, fsc=fsc, fsc_resolution_A=history.get("final_resolution_A") if fsc is not None else None,
                       apix=apix, box=box, history=history, rotations=rotations, volume=volume, summary=summary,
                       pose_error_history=history.get("pose_error"), scores=scores,
                       classes=[{k: c[k] for k in ("class", "n_particles", "resolution_A", "map")} for c in classes]
                       or None)


def _classes_from_folder(out: Path, history: dict) -> list[dict]:
    """A K > 1 run's classes from its folder: the final sizes (history.json ``class_sizes``, last epoch) and,
    per class with maps, classNNN/fsc.txt (curve, resolution at 0.143) and classNNN/map.mrc at the working box.
    [] for a one-class run."""
    from cryospin_relion.geometry.filters import resample_box
    from cryospin_relion.geometry.fsc import resolution_at
    from cryospin_relion.io.fsc_table import read_fsc
    from cryospin_relion.io.mrc import read_mrc

    sizes = next((s for s in reversed(history.get("class_sizes") or []) if s), None)
    if not sizes:
        return []
    classes = []
    for k, n in enumerate(sizes, 1):
        d = out / f"class{k:03d}"
        c = {"class": k, "n_particles": int(n), "resolution_A": None, "map": None, "fsc": None}
        if (d / "fsc.txt").is_file() and (d / "map.mrc").is_file():
            curve, box, apix = _read(d / "fsc.txt", "the FSC table", read_fsc)
            vol, _ = _read(d / "map.mrc", "the map", read_mrc)
            res = float(resolution_at(np.asarray(curve), box, apix, 0.143))
            c.update(resolution_A=res, fsc=curve, box=box, apix=apix,
                     map=resample_box(vol, box) if vol.shape[-1] != box else vol)
        classes.append(c)
    return classes
