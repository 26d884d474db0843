"""The final outputs of an ab-initio run, written atomically into its folder.

- ``half1_map.mrc``, ``half2_map.mrc``: backprojections of the two random halves with the
  final poses (both halves come from ONE ab-initio run, so they are not independent
  refinements and their FSC is optimistic);
- ``map.mrc``: all particles, low-pass filtered at the half-map 0.143 resolution (a RELION
  initial model for ``--ini_high``). These three are at the particles' box and pixel size,
  as RELION and cryoSPARC refinement need (Fourier padding adds no information);
- ``decoder_map.mrc``: the learned volume, at the working box;
- ``fsc.txt``; ``particles.star`` (and ``particles.cs`` for .cs input) with every input column;
- ``open_in_chimerax.cxc``: opens map.mrc and the half maps in ChimeraX at their voxel size, centred,
  at a contour level enclosing the molecule's volume (geometry/threshold.py: from ``--mw`` when given,
  else from the map);
- ``logfile.pdf`` and PNGs (the report never fails the run).

With ``--sym`` other than C1 (lifecycle/symmetry.py) the final poses and the decoder map are first
rotated into RELION's frame of the group, and the half maps are backprojected with its operators.

With K > 1 classes (``--classes``) the maps, ``decoder_map.mrc``, ``fsc.txt`` and the ChimeraX script
are made per class, from that class's particles only, in ``class001/``, ``class002/``, ... (no top-level
maps): the halves are the run's random halves restricted to the class, and every class gets its own
``--sym`` frame (classes have unrelated orientations and hands). ``particles.star`` gets
``rlnClassNumber`` (1-based), ``particles.cs`` cryoSPARC's class fields (io/particles.py
``CS_CLASS_FIELDS``). A class with fewer than 2 particles in a half gets no maps (logged, resolution
null in the summary). K = 1 writes exactly the files above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cryospin_relion.engine.distributed import ALONE, World
from cryospin_relion.evaluate.orientation import DirectionalResolution, directional_resolution, orientation_efficiency
from cryospin_relion.geometry.filters import lowpass, resample_box
from cryospin_relion.geometry.hand import flip_poses_hand, flip_volume_hand
from cryospin_relion.geometry.threshold import contour_level
from cryospin_relion.halfmaps import output_apix, reconstruct_halves
from cryospin_relion.io.chimerax import ScriptMap, write_chimerax_script
from cryospin_relion.io.fsc_table import write_fsc
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.particles import ParticleTable
from cryospin_relion.io.read import write_particles


CHIMERAX_SCRIPT = "open_in_chimerax.cxc"
# the files of one set of maps: the top level of a K = 1 run, each class folder of a K > 1 run
MAP_FILES = ("half1_map.mrc", "half2_map.mrc", "map.mrc", "decoder_map.mrc", "fsc.txt", CHIMERAX_SCRIPT)


def class_folder(number: int) -> str:
    """The folder of class ``number`` (1-based, as rlnClassNumber): class001, class002, ..."""
    return f"class{number:03d}"


def output_files(box: int, n_classes: int = 1) -> list[str]:
    """Every file name (relative to the folder) an abinit run at working box ``box`` with ``n_classes``
    classes may write in its folder."""
    from cryospin_relion.lifecycle.checkpoint import CHECKPOINT, PREVIOUS
    from cryospin_relion.report import CLASS_PNG_NAMES, PDF_NAME, PNG_NAMES

    per_class = ([f"{class_folder(k)}/{name}" for k in range(1, n_classes + 1) for name in MAP_FILES]
                 if n_classes > 1 else [])
    return [*MAP_FILES, "particles.star", "particles.cs", "config.yaml", "run.log", "history.json", CHECKPOINT,
            PREVIOUS, PDF_NAME, *PNG_NAMES.values(), *CLASS_PNG_NAMES.values(), f"cache_{box}.npy",
            f"cache_{box}.json", *per_class]


@dataclass
class FinalResult:
    """What the outputs are made of, for the summary and the report."""

    resolution_A: float  # half-map FSC 0.143
    apix: float  # voxel size at the working box
    box: int  # working box
    fsc: np.ndarray  # (box // 2 + 1,)
    map: np.ndarray  # unfiltered map of all particles at the working box
    rotations: np.ndarray  # (N, 3, 3) final RELION poses (hand flipped if asked)
    orientation_efficiency: float | None = None  # cryoEF E_od of the final views (evaluate/orientation.py)
    directional: DirectionalResolution | None = None  # conical half-map FSC at the working box
    scores: "ParticleScores | None" = None  # per-particle scores (lifecycle/scores.py), None if not computed
    symmetry: "SymmetryFrame | None" = None  # --sym other than C1 (lifecycle/symmetry.py)
    # K > 1: every class, in order (this result is then the largest class's with maps); None when K = 1
    classes: "list[ClassResult] | None" = None


@dataclass
class ClassResult:
    """One class of a K > 1 run: its size and its maps' result (None: too few particles for two halves)."""

    number: int  # 1-based, as rlnClassNumber
    n_particles: int
    result: FinalResult | None  # rotations (n_particles, 3, 3): the class's particles; scores None

    @property
    def folder(self) -> str:
        return class_folder(self.number)

    @property
    def resolution_A(self) -> float | None:
        return None if self.result is None else self.result.resolution_A

    def summary(self) -> dict:
        """The entry of the JSON summary's "classes" list (map relative to the run's folder)."""
        entry = {"class": self.number, "n_particles": self.n_particles, "resolution_A": self.resolution_A,
                 "map": None if self.result is None else f"{self.folder}/map.mrc"}
        if self.result is not None and self.result.symmetry is not None:
            entry["symmetry_score"] = round(float(self.result.symmetry.score), 4)
        return entry


def write_final_outputs(out: Path, table: ParticleTable, images, apix_work: np.ndarray, poses: tuple, decoder: np.ndarray,
                        *, flip_hand: bool, seed: int, use_ctf: bool, write_cs: bool, device, progress: bool,
                        log: logging.Logger, mw_kda: float | None = None, scores=None, sym: str = "C1",
                        world: World = ALONE, sym_mode: str = "align", n_classes: int = 1,
                        classes: np.ndarray | None = None, decoders: list[np.ndarray] | None = None,
                        ) -> FinalResult | None:
    """Backproject the halves with the final ``poses`` (rotations (N, 3, 3), shifts (N, 2) working-box px,
    content translation) and write every output file; ``decoder`` is the learned map (n, n, n); ``mw_kda``
    (molecular weight, kDa) sets the ChimeraX script's contour levels; ``scores`` (lifecycle/scores.py
    ``ParticleScores``) go into the particle files; ``sym`` (RELION's point-group name): poses and maps in its
    frame, half maps backprojected with its operators (lifecycle/symmetry.py); ``sym_mode`` "impose": the run
    kept the volume symmetric in that frame, nothing is moved and the C1 map is only scored.

    K > 1 classes (``n_classes``; a class may be empty): ``classes`` (N,) the 0-based class of each particle,
    ``decoders`` the K learned maps (``decoder`` is then unused); the maps go in one folder per class
    (``class_folder``) and the result is the largest class's (with maps), its ``classes`` listing them all.

    Data parallel (``world``): every rank calls this; each backprojects its share of the particles, the
    accumulators are summed, rank 0 writes the files and returns the result, the others return None."""
    R, t_px = poses
    box = int(decoder.shape[-1])
    if flip_hand:
        R, decoder = flip_poses_hand(R), flip_volume_hand(decoder)
    shifts_A = -t_px * apix_work[:, None]  # RELION origin = - content translation * pixel size
    halves = table.halves(seed)
    apix_out = float(output_apix(table, box, box))
    from cryospin_relion.geometry.symmetry import hand_flip_keeps_frame, parse_symmetry
    from cryospin_relion.lifecycle.symmetry import imposed_frame, to_symmetry_frame

    if sym_mode == "impose" and flip_hand and not hand_flip_keeps_frame(sym):
        log.info(f"--flip-hand: the mirrored {sym} map leaves RELION's frame; searching the frame again")
        sym_mode = "align"

    mine = None if world.alone else world.share(len(table)).numpy()

    def maps_of(members: np.ndarray | None, R: np.ndarray, shifts_A: np.ndarray, decoder: np.ndarray, label: str = ""):
        """The half maps of the particles ``members`` (indices, increasing; None = all) with the final poses, in
        the --sym frame found (or checked) on their own C1 maps: (HalfMaps, frame or None, R, shifts_A (N, ...):
        the members' rows moved into that frame, decoder in it). Collective: every rank calls it alike."""
        rows = mine if members is None else members if mine is None else np.intersect1d(members, mine)
        sel = slice(None) if members is None else members
        part = dict(rows=rows, reduce=None if world.alone else _summed(world), progress=progress and world.is_main)
        frame = None
        if parse_symmetry(sym) != "C1":  # the C1 maps first: the symmetry axes are searched on them
            log.info(f"{label}backprojecting the two halves with the final poses, C1 (to "
                     + ("check the symmetry)" if sym_mode == "impose" else "find the symmetry axes)"))
            c1 = reconstruct_halves(images, table, rotations=R, shifts_A=shifts_A, halves=halves, use_ctf=use_ctf,
                                    device=device, seed=seed, **part)
            frame = (imposed_frame(sym, R[sel], shifts_A[sel], c1.map, c1.fsc, decoder, log) if sym_mode == "impose"
                     else to_symmetry_frame(sym, R[sel], shifts_A[sel], c1.map, c1.fsc, decoder, apix_out, log))
            if members is None:
                R, shifts_A = frame.rotations, frame.shifts_A
            else:  # only this class's poses move
                R, shifts_A = np.array(R, dtype=np.float64), np.array(shifts_A, dtype=np.float64)
                R[members], shifts_A[members] = frame.rotations, frame.shifts_A
            decoder = frame.decoder
            if not world.alone:  # one frame for all ranks (the search runs on each; rank 0's counts)
                import torch

                R = world.from_main_(torch.from_numpy(np.ascontiguousarray(R, dtype=np.float64))).numpy()
                shifts_A = world.from_main_(torch.from_numpy(np.ascontiguousarray(shifts_A, dtype=np.float64))).numpy()
        log.info(f"{label}backprojecting the two halves with the final poses"
                 + (f", symmetry {frame.sym}" if frame else ""))
        hm = reconstruct_halves(images, table, rotations=R, shifts_A=shifts_A, halves=halves, use_ctf=use_ctf,
                                device=device, seed=seed, symmetry=None if frame is None else frame.operators, **part)
        return hm, frame, R, shifts_A, decoder

    if n_classes > 1:
        return _write_classes(out, table, maps_of, R, shifts_A, halves, classes, n_classes, decoders,
                              flip_hand=flip_hand, write_cs=write_cs, apix_out=apix_out, box=box, mw_kda=mw_kda,
                              scores=scores, main=world.is_main, log=log)
    if classes is not None and np.any(np.asarray(classes) != 0):
        raise ValueError(f"classes: particles in classes other than 0 with n_classes = {n_classes}")
    hm, frame, R, shifts_A, decoder = maps_of(None, R, shifts_A, decoder)
    if not world.is_main:
        return None
    res = float(hm.resolution)
    write_maps(out, hm, decoder, table, apix_out, mw_kda, log)
    new = table.with_poses(R, shifts_A, halves)
    if scores is not None:
        new = new.with_scores(scores.confidence, scores.loss)
    write_particles(new, out / "particles.star")
    if write_cs:
        write_particles(new, out / "particles.cs")
    eff, directional = orientation_diagnostics(R, hm.half1, hm.half2, apix_out, log,
                                               None if frame is None else frame.operators)
    return FinalResult(res, apix_out, box, hm.fsc, hm.map, R, eff, directional, scores, frame)


def write_maps(folder: Path, hm, decoder: np.ndarray, table: ParticleTable, apix_out: float, mw_kda: float | None,
               log: logging.Logger) -> None:
    """MAP_FILES in ``folder`` from the half maps ``hm`` (halfmaps.HalfMaps at the working box, voxel size
    ``apix_out``) and the learned map ``decoder``: the maps resampled to the particles' box (map.mrc low-passed at
    the half-map resolution), decoder_map.mrc and fsc.txt at the working box, the ChimeraX script."""
    box = int(decoder.shape[-1])
    res = float(hm.resolution)
    pbox, papix = int(table.box), float(output_apix(table, int(table.box), int(table.box)))
    maps = {"map.mrc": resample_box(lowpass(hm.map, res, apix_out), pbox),
            "half1_map.mrc": resample_box(hm.half1, pbox), "half2_map.mrc": resample_box(hm.half2, pbox)}
    for name in ("half1_map.mrc", "half2_map.mrc", "map.mrc"):
        write_mrc(folder / name, maps[name], papix)
    write_chimerax(folder, maps, papix, mw_kda, log)
    write_mrc(folder / "decoder_map.mrc", decoder, apix_out)
    write_fsc(folder / "fsc.txt", hm.fsc, box, apix_out)


def _write_classes(out: Path, table: ParticleTable, maps_of, R: np.ndarray, shifts_A: np.ndarray, halves: np.ndarray,
                   classes: np.ndarray | None, n_classes: int, decoders: list[np.ndarray] | None, *, flip_hand: bool,
                   write_cs: bool, apix_out: float, box: int, mw_kda: float | None, scores, main: bool,
                   log: logging.Logger) -> FinalResult | None:
    """``write_final_outputs`` for K = ``n_classes`` > 1: the maps of each class in its folder (``maps_of``:
    collective, so every rank runs it for every class with maps, in class order), then the particle files
    with the classes. ``R`` (N, 3, 3) and ``shifts_A`` (N, 2): the final poses (hand already flipped)."""
    n = len(table)
    if classes is None or decoders is None or len(decoders) != n_classes:
        raise ValueError(f"n_classes = {n_classes}: classes (N,) and {n_classes} decoder maps are needed")
    classes = np.asarray(classes).reshape(n).astype(np.int64)
    if n and (classes.min() < 0 or classes.max() >= n_classes):
        raise ValueError(f"classes: expected 0-based classes in [0, {n_classes}), got "
                         f"[{classes.min()}, {classes.max()}]")
    found: list[ClassResult] = []
    for k in range(n_classes):
        members = np.flatnonzero(classes == k)
        name = class_folder(k + 1)
        in_half = np.bincount(halves[members], minlength=3)[1:]  # the same on every rank: all ranks skip alike
        if in_half.min() < 2:
            log.info(f"{name}: {len(members)} particles, no maps (fewer than 2 in a half: {in_half[0]} / {in_half[1]})")
            found.append(ClassResult(k + 1, len(members), None))
            continue
        decoder = flip_volume_hand(decoders[k]) if flip_hand else np.asarray(decoders[k])
        hm, frame, R, shifts_A, decoder = maps_of(members, R, shifts_A, decoder, label=f"{name}: ")
        if not main:
            continue
        folder = out / name
        folder.mkdir(exist_ok=True)
        write_maps(folder, hm, decoder, table, apix_out, mw_kda, log)
        log.info(f"{name}: {len(members)} particles ({100 * len(members) / max(n, 1):.1f}%), half-map FSC 0.143 "
                 f"resolution {float(hm.resolution):.2f} A, maps in {folder}")
        eff, directional = orientation_diagnostics(R[members], hm.half1, hm.half2, apix_out, log,
                                                   None if frame is None else frame.operators, label=f"{name}: ")
        found.append(ClassResult(k + 1, len(members), FinalResult(
            float(hm.resolution), apix_out, box, hm.fsc, hm.map, R[members], eff, directional, None, frame)))
    if not main:
        return None
    new = table.with_poses(R, shifts_A, halves).with_classes(classes)
    if scores is not None:
        new = new.with_scores(scores.confidence, scores.loss)
    write_particles(new, out / "particles.star")
    if write_cs:
        write_particles(new, out / "particles.cs")
    with_maps = [c for c in found if c.result is not None]
    if not with_maps:  # every class under 2 particles a half: nothing to measure
        log.info(f"no class has 2 particles in each half: no maps (of {n} particles in {n_classes} classes)")
        empty = FinalResult(float("nan"), apix_out, box, np.zeros(box // 2 + 1), np.zeros((box,) * 3, np.float32),
                            np.zeros((0, 3, 3)))
        return replace(empty, scores=scores, classes=found)
    largest = max(with_maps, key=lambda c: c.n_particles)  # the first of equals
    return replace(largest.result, scores=scores, classes=found)


def _summed(world: World):
    """``reduce`` for ``reconstruct_halves``: a half's accumulator summed over the ranks."""
    def reduce(acc) -> None:
        world.sum_(acc.num)
        world.sum_(acc.weight)
    return reduce


def orientation_diagnostics(R, half1, half2, apix: float, log: logging.Logger, operators: np.ndarray | None = None,
                            max_views: int = 50_000, label: str = ""):
    """(cryoEF efficiency of the views of ``R``, directional resolution of the half maps), each None
    when it fails (logged; the diagnostics never fail the run). With point-group ``operators`` (G, 3, 3) the
    views are those of the symmetry-expanded poses A @ S (what the symmetric maps are made of: a --sym run's
    poses may all lie in one asymmetric unit, measured E_od 0.00 alone and 0.95 expanded, D7); at most
    ``max_views`` poses (an even subsample) enter the efficiency; ``label`` starts the log lines (a class's name)."""
    eff = directional = None
    try:
        views = np.asarray(R)[:: max(1, -(-len(R) // max_views))]
        if operators is not None:
            views = np.einsum("nij,gjk->ngik", views, np.asarray(operators, dtype=views.dtype)).reshape(-1, 3, 3)
        eff = orientation_efficiency(views)
    except Exception as e:
        log.info(f"{label}orientation efficiency not computed: {type(e).__name__}: {e}")
    try:
        directional = directional_resolution(half1, half2, apix)
    except Exception as e:
        log.info(f"{label}directional resolution not computed: {type(e).__name__}: {e}")
    if eff is not None and directional is not None:
        log.info(f"{label}orientation: view-distribution efficiency {eff:.2f} (cryoEF E_od, 1 = uniform); directional "
                 f"resolution (FSC 0.143 in {len(directional.resolution_A)} cones of "
                 f"{directional.cone_half_angle_deg:.0f} deg) best {directional.best_A:.2f} A, worst "
                 f"{directional.worst_A:.2f} A, median {directional.median_A:.2f} A")
    return eff, directional


def write_chimerax(out: Path, maps: dict[str, np.ndarray], apix: float, mw_kda: float | None,
                   log: logging.Logger) -> None:
    """``open_in_chimerax.cxc`` next to ``maps`` (file name -> map (n, n, n), all at voxel size ``apix``,
    already written in ``out``): map.mrc shown, the half maps opened hidden, each at its own
    ``contour_level`` (the same enclosed volume when ``mw_kda`` is given). A failure is logged, never
    raised (a convenience must not fail the run)."""
    from cryospin_relion import CITATION, __version__

    try:
        entries = []
        for i, (name, vol) in enumerate(maps.items()):
            level, rule = contour_level(vol, apix, mw_kda)
            entries.append(ScriptMap(name, level, apix, int(vol.shape[-1]), show=i == 0, note=rule))
    except Exception as e:
        log.info(f"ChimeraX script not written: {type(e).__name__}: {e}")
        return
    header = [f"cryospin {__version__}: the maps of this run in ChimeraX, run it in a fresh session:",
              f"  chimerax {CHIMERAX_SCRIPT}   (or, in ChimeraX: open /path/to/{CHIMERAX_SCRIPT})",
              "voxelSize = the maps' header voxel size; originIndex n//2 puts the particle centre (voxel n//2, "
              "RELION's convention; the header origin is 0) at (0,0,0) A",
              "show a half map: volume #2 show; change a level: volume #1 level VALUE",
              f"cite: {CITATION}"]
    write_chimerax_script(out / CHIMERAX_SCRIPT, entries, header)
    log.info(f"ChimeraX script {out / CHIMERAX_SCRIPT}: map.mrc at level {entries[0].level:.4g} "
             f"({entries[0].note})")


def add_orientation_summary(summary: dict, result: FinalResult, log: logging.Logger) -> dict:
    """Put the orientation diagnostics of ``result`` into ``summary`` ("orientation_efficiency",
    "directional_resolution_A": {best, worst, median, spread}) and log a ``warning:`` line, also
    appended to ``summary["warnings"]``, when the efficiency is under EFFICIENCY_WARN_BELOW (0.5).
    With --sym, also the symmetry entries (``SymmetryFrame.summary``) and its warning."""
    from cryospin_relion.evaluate.orientation import orientation_summary

    entries, warned = orientation_summary(result.orientation_efficiency, result.directional)
    summary.update(entries)
    if result.symmetry is not None:
        summary.update(result.symmetry.summary())
        warned = [*warned, *filter(None, [result.symmetry.warning()])]
    for w in warned:
        log.info(f"warning: {w}")
        summary.setdefault("warnings", []).append(w)
    return summary


def write_report(out: Path, result: FinalResult, history_json: dict, summary: dict, log: logging.Logger) -> None:
    """logfile.pdf and the PNGs; a failure is logged, never raised (the maps are what matters). K > 1: the FSC
    page shows every class's curve (the largest class first), the other pages the largest class, and the class
    pages (report/classes.py) the sizes per epoch, each class's resolution and central slices."""
    from cryospin_relion.report import make_report

    fsc, classes = result.fsc, None
    if result.classes is not None:
        drawn = sorted((c for c in result.classes if c.result is not None), key=lambda c: c.result is not result)
        fsc = {f"class {c.number}" + (" (largest)" if c.result is result else ""): c.result.fsc for c in drawn} or None
        classes = [{"class": c.number, "n_particles": c.n_particles, "resolution_A": c.resolution_A,
                    "map": None if c.result is None else c.result.map} for c in result.classes]
    try:
        make_report(out, fsc=fsc, fsc_resolution_A=result.resolution_A, apix=result.apix, box=result.box,
                    history=history_json, rotations=result.rotations, volume=result.map, summary=summary,
                    pose_error_history=history_json.get("pose_error"),
                    orientation={"efficiency": result.orientation_efficiency, "directional": result.directional},
                    scores=None if result.scores is None else {"confidence": result.scores.confidence,
                                                               "cutoff": result.scores.cutoff,
                                                               "loss": result.scores.loss}, classes=classes)
    except Exception as e:  # the report must never fail the run
        log.info(f"report not written: {type(e).__name__}: {e}")


def final_table(summary: dict, out: Path) -> str:
    """The short table printed at the end of a run (K > 1: one line per class instead of the map line)."""
    classes = summary.get("classes")
    res = summary["resolution_A"]
    scripts = [p for p in ([out / CHIMERAX_SCRIPT] if not classes else
                           [out / Path(c["map"]).parent / CHIMERAX_SCRIPT for c in classes if c["map"]]) if p.is_file()]
    rows = [
        ("resolution (FSC 0.143, half maps)" + (", largest class" if classes else ""),
         (f"{res:.2f} A" if res is not None else "-") + f"  (Nyquist {2 * summary['apix']:.2f} A)"),
        ("particles used", f"{summary['n_particles']}"),
        ("stage 1 (auto-encoding)", f"{summary['stage1_s']:.0f} s"),
        ("stage 2 (auto-decoding)", f"{summary['stage2_s']:.0f} s"),
        ("maps, FSC, pose files", f"{summary['final_outputs_s']:.0f} s"),
        *([("map / half maps", f"{out / 'map.mrc'}  {out / 'half1_map.mrc'}  {out / 'half2_map.mrc'}")] if not classes
          else [(f"class {c['class']} ({c['n_particles']} particles)",
                 f"{out / c['map']}  {c['resolution_A']:.2f} A" if c["map"] else "no maps (too few particles)")
                for c in classes]),
        ("poses", "  ".join(str(out / n) for n in ("particles.star", "particles.cs") if (out / n).is_file())),
        ("report", str(out / "logfile.pdf")),
        ("ChimeraX", "  ".join(f"chimerax {p}" for p in scripts) or "-"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["", "cryospin abinit finished", *(f"  {k:<{w}}  {v}" for k, v in rows)])
