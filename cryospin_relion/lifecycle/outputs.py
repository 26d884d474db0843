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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


def output_files(box: int) -> list[str]:
    """Every file name an abinit run at working box ``box`` may write in its folder."""
    from cryospin_relion.lifecycle.checkpoint import CHECKPOINT, PREVIOUS
    from cryospin_relion.report import PDF_NAME, PNG_NAMES

    return ["half1_map.mrc", "half2_map.mrc", "map.mrc", "decoder_map.mrc", "fsc.txt", CHIMERAX_SCRIPT,
            "particles.star", "particles.cs", "config.yaml", "run.log", "history.json", CHECKPOINT, PREVIOUS, PDF_NAME,
            *PNG_NAMES.values(), f"cache_{box}.npy", f"cache_{box}.json"]


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


def write_final_outputs(out: Path, table: ParticleTable, images, apix_work: np.ndarray, poses: tuple, decoder: np.ndarray,
                        *, flip_hand: bool, seed: int, use_ctf: bool, write_cs: bool, device, progress: bool,
                        log: logging.Logger, mw_kda: float | None = None, scores=None, sym: str = "C1",
                        world: World = ALONE, sym_mode: str = "align") -> FinalResult | None:
    """Backproject the halves with the final ``poses`` (rotations (N, 3, 3), shifts (N, 2) working-box px,
    content translation) and write every output file; ``decoder`` is the learned map (n, n, n); ``mw_kda``
    (molecular weight, kDa) sets the ChimeraX script's contour levels; ``scores`` (lifecycle/scores.py
    ``ParticleScores``) go into the particle files; ``sym`` (RELION's point-group name): poses and maps in its
    frame, half maps backprojected with its operators (lifecycle/symmetry.py); ``sym_mode`` "impose": the run
    kept the volume symmetric in that frame, nothing is moved and the C1 map is only scored.

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
    part = dict(rows=mine, reduce=None if world.alone else _summed(world), progress=progress and world.is_main)
    frame = None
    if parse_symmetry(sym) != "C1":  # the C1 maps first: the symmetry axes are searched on them
        log.info("backprojecting the two halves with the final poses, C1 (to "
                 + ("check the symmetry)" if sym_mode == "impose" else "find the symmetry axes)"))
        c1 = reconstruct_halves(images, table, rotations=R, shifts_A=shifts_A, halves=halves, use_ctf=use_ctf,
                                device=device, seed=seed, **part)
        frame = (imposed_frame(sym, R, shifts_A, c1.map, c1.fsc, decoder, log) if sym_mode == "impose" else
                 to_symmetry_frame(sym, R, shifts_A, c1.map, c1.fsc, decoder, apix_out, log))
        R, shifts_A, decoder = frame.rotations, frame.shifts_A, frame.decoder
        if not world.alone:  # one frame for all ranks (the search runs on each; rank 0's counts)
            import torch

            R = world.from_main_(torch.from_numpy(np.ascontiguousarray(R, dtype=np.float64))).numpy()
            shifts_A = world.from_main_(torch.from_numpy(np.ascontiguousarray(shifts_A, dtype=np.float64))).numpy()
    log.info("backprojecting the two halves with the final poses" + (f", symmetry {frame.sym}" if frame else ""))
    hm = reconstruct_halves(images, table, rotations=R, shifts_A=shifts_A, halves=halves, use_ctf=use_ctf,
                            device=device, seed=seed, symmetry=None if frame is None else frame.operators, **part)
    if not world.is_main:
        return None
    res = float(hm.resolution)
    pbox, papix = int(table.box), float(output_apix(table, int(table.box), int(table.box)))
    maps = {"map.mrc": resample_box(lowpass(hm.map, res, apix_out), pbox),
            "half1_map.mrc": resample_box(hm.half1, pbox), "half2_map.mrc": resample_box(hm.half2, pbox)}
    for name in ("half1_map.mrc", "half2_map.mrc", "map.mrc"):
        write_mrc(out / name, maps[name], papix)
    write_chimerax(out, maps, papix, mw_kda, log)
    write_mrc(out / "decoder_map.mrc", decoder, apix_out)
    write_fsc(out / "fsc.txt", hm.fsc, box, apix_out)
    new = table.with_poses(R, shifts_A, halves)
    if scores is not None:
        new = new.with_scores(scores.confidence, scores.loss)
    write_particles(new, out / "particles.star")
    if write_cs:
        write_particles(new, out / "particles.cs")
    eff, directional = orientation_diagnostics(R, hm.half1, hm.half2, apix_out, log,
                                               None if frame is None else frame.operators)
    return FinalResult(res, apix_out, box, hm.fsc, hm.map, R, eff, directional, scores, frame)


def _summed(world: World):
    """``reduce`` for ``reconstruct_halves``: a half's accumulator summed over the ranks."""
    def reduce(acc) -> None:
        world.sum_(acc.num)
        world.sum_(acc.weight)
    return reduce


def orientation_diagnostics(R, half1, half2, apix: float, log: logging.Logger, operators: np.ndarray | None = None,
                            max_views: int = 50_000):
    """(cryoEF efficiency of the views of ``R``, directional resolution of the half maps), each None
    when it fails (logged; the diagnostics never fail the run). With point-group ``operators`` (G, 3, 3) the
    views are those of the symmetry-expanded poses A @ S (what the symmetric maps are made of: a --sym run's
    poses may all lie in one asymmetric unit, measured E_od 0.00 alone and 0.95 expanded, D7); at most
    ``max_views`` poses (an even subsample) enter the efficiency."""
    eff = directional = None
    try:
        views = np.asarray(R)[:: max(1, -(-len(R) // max_views))]
        if operators is not None:
            views = np.einsum("nij,gjk->ngik", views, np.asarray(operators, dtype=views.dtype)).reshape(-1, 3, 3)
        eff = orientation_efficiency(views)
    except Exception as e:
        log.info(f"orientation efficiency not computed: {type(e).__name__}: {e}")
    try:
        directional = directional_resolution(half1, half2, apix)
    except Exception as e:
        log.info(f"directional resolution not computed: {type(e).__name__}: {e}")
    if eff is not None and directional is not None:
        log.info(f"orientation: view-distribution efficiency {eff:.2f} (cryoEF E_od, 1 = uniform); directional "
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
    """logfile.pdf and the PNGs; a failure is logged, never raised (the maps are what matters)."""
    from cryospin_relion.report import make_report

    try:
        make_report(out, fsc=result.fsc, fsc_resolution_A=result.resolution_A, apix=result.apix, box=result.box,
                    history=history_json, rotations=result.rotations, volume=result.map, summary=summary,
                    pose_error_history=history_json.get("pose_error"),
                    orientation={"efficiency": result.orientation_efficiency, "directional": result.directional},
                    scores=None if result.scores is None else {"confidence": result.scores.confidence,
                                                               "cutoff": result.scores.cutoff,
                                                               "loss": result.scores.loss})
    except Exception as e:  # the report must never fail the run
        log.info(f"report not written: {type(e).__name__}: {e}")


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
        ("ChimeraX", f"chimerax {out / CHIMERAX_SCRIPT}" if (out / CHIMERAX_SCRIPT).is_file() else "-"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["", "cryospin abinit finished", *(f"  {k:<{w}}  {v}" for k, v in rows)])
