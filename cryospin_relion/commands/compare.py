"""Compare a map with a reference: align over rotation, translation and hand, then FSC (and pose errors).

The map (--map) is aligned to the reference (--ref) over rotations AND the
mirror: a global search (4608 quasi-uniform rotations, both hands, maps
low-passed to ~1/4 Nyquist at a reduced box, all translations by FFT), then a
local refinement at the full box. Reported (JSON on stdout, and --json FILE):

  mirror             true if the map had to be hand-flipped (z flip about N//2) first
  rotation_matrix    R, with aligned(r) = m(R^T (r - t)), m = flipped map if mirror
  rotation_angle_deg, rotation_axis, shift_A (t in A, x y z)
  correlation        normalised correlation after alignment (full box, up to refinement_band_A,
                     the resolution where the FSC of the roughly aligned maps falls below 0.143);
                     correlation_low_res(_other_hand): at the medium box, the best of each hand
  fsc_0.5_A, fsc_0.143_A and the FSC curve between the aligned map and the reference

With --poses est.star --true-poses gt.star (RELION STAR or cryoSPARC .cs; matched
by image name, else by row order), the rotation and viewing-direction errors in
degrees after the best global alignment of the two pose sets (one rotation H
and the hand: A_est ~ P(A_true) H, P(A) = A or M A M with M = diag(1, 1, -1)),
and the shift error after fitting one global 3D translation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cryospin_relion.errors import InputError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", required=True, help="map to align (e.g. the ab-initio map.mrc)")
    p.add_argument("--ref", required=True, help="reference map (e.g. ground_truth.mrc), same box")
    p.add_argument("--apix", type=float, default=None, help="pixel size in A (when the headers have none)")
    p.add_argument("--poses", default=None, help="estimated poses (.star or .cs) to score against --true-poses")
    p.add_argument("--true-poses", default=None, help="true poses (.star or .cs), e.g. the simulated particles.star")
    p.add_argument("--no-mirror", action="store_true", help="do not try the mirrored hand")
    p.add_argument("--resample", action="store_true",
                   help="resample --map onto the grid of --ref (Fourier crop/pad by the header voxel sizes) "
                        "when their boxes differ, e.g. an ab-initio map at a smaller working box")
    p.add_argument("--rotations", type=int, default=4608,
                   help="rotations in the global search (default 4608, ~9 degrees apart)")
    p.add_argument("--o-aligned", default=None, help="write the aligned map here (.mrc)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")


def _read_map(path: str):
    from cryospin_relion.io.mrc import read_mrc

    vol, voxel = read_mrc(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"{path}: nx/ny/nz: need a cubic 3D map, got {tuple(vol.shape)[::-1]} (x, y, z)")
    if not np.isfinite(vol).all():
        raise InputError(f"{path}: data: map has non-finite values")
    return vol, voxel


def _read_poses(path: str):
    from cryospin_relion.io.read import read_particles

    table = read_particles(path, no_ctf=True, check_stacks=False)
    if table.rotations is None:
        raise InputError(f"{path}: rlnAngleRot: no poses in the file")
    return table


def _keys(table) -> list[str]:
    names = table.extra.get("stack_names")
    names = table.stack_paths if names is None else names
    return [f"{Path(str(s)).name}#{int(i)}" for s, i in zip(names, table.stack_indices)]


def compare_poses(est_path: str, true_path: str) -> dict:
    from cryospin_relion.evaluate.pose_error import match_particles, pose_errors

    est, tru = _read_poses(est_path), _read_poses(true_path)
    m = match_particles(_keys(tru), _keys(est))
    how = "image name"
    if m is None or len(m[0]) == 0:
        if len(est) != len(tru):
            raise InputError(f"{est_path}: rlnImageName: no particle matches {true_path} by image name "
                             f"and the counts differ ({len(est)} vs {len(tru)})")
        m = (np.arange(len(tru)), np.arange(len(est)))
        how = "row order"
    it, ie = m
    res = pose_errors(tru.rotations[it], est.rotations[ie], tru.shifts_A[it], est.shifts_A[ie])
    res["matched_by"] = how
    return res


def main(args) -> int:
    import torch

    from cryospin_relion.evaluate.align import align_maps, transform_volume
    from cryospin_relion.geometry.fsc import fsc, resolution_at, shell_resolution
    from cryospin_relion.geometry.hand import MIRROR
    from cryospin_relion.geometry.rotations import geodesic_distance_deg, rotation_angle_deg, so3_log

    t0 = time.perf_counter()
    if (args.poses is None) != (args.true_poses is None):
        raise InputError("--poses/--true-poses: give both or neither")
    if args.rotations < 100:
        raise InputError(f"--rotations: need at least 100 (got {args.rotations})")
    if args.apix is not None and not args.apix > 0:
        raise InputError(f"--apix: must be > 0 (got {args.apix})")
    from cryospin_relion.io.overwrite import refuse_overwriting

    refuse_overwriting({"--o-aligned": [args.o_aligned] if args.o_aligned else [],
                        "--json": [args.json] if args.json else []},
                       {"--map": [args.map], "--ref": [args.ref], "--poses": [args.poses] if args.poses else [],
                        "--true-poses": [args.true_poses] if args.true_poses else []})
    mov, vm = _read_map(args.map)
    ref, vr = _read_map(args.ref)
    if mov.shape != ref.shape and args.resample:
        from cryospin_relion.evaluate.simulate import resample_volume

        if not (vm and vr):
            raise InputError(f"{args.map if not vm else args.ref}: voxel size: unset in the header; "
                             "--resample needs both voxel sizes")
        mov, got = resample_volume(mov, vm, ref.shape[-1], vr)
        vm = vr
    if mov.shape != ref.shape:
        raise InputError(f"{args.map}: nx: box {mov.shape[-1]} differs from the reference {args.ref} "
                         f"({ref.shape[-1]}); pass --resample or resample one of them first")
    if args.apix:
        apix = float(args.apix)
    else:
        if vm and vr and abs(vm - vr) / vr > 5e-3:
            raise InputError(f"{args.map}: voxel size: {vm:.4f} A differs from the reference {args.ref} "
                             f"({vr:.4f} A); pass --apix to override")
        apix = vr or vm
        if not apix:
            raise InputError(f"{args.map}: voxel size: unset in both map headers; pass --apix")
    pose_result = compare_poses(args.poses, args.true_poses) if args.poses else None

    res = align_maps(mov, ref, n_rotations=args.rotations, try_mirror=not args.no_mirror)
    aligned = transform_volume(mov, res.rotation, res.shift_px, res.mirror)
    n = ref.shape[-1]
    curve = fsc(torch.as_tensor(aligned), torch.as_tensor(ref)).numpy()
    shells = shell_resolution(n, apix)
    rv = so3_log(torch.as_tensor(res.rotation)).numpy()
    ang = float(rotation_angle_deg(torch.as_tensor(res.rotation)))
    out = {
        "map": args.map, "ref": args.ref, "box": n, "apix": apix,
        "mirror": res.mirror,
        "rotation_matrix": np.round(res.rotation, 6).tolist(),
        "rotation_angle_deg": round(ang, 3),
        "rotation_axis": (rv / max(np.linalg.norm(rv), 1e-12)).round(6).tolist(),
        "shift_A": (res.shift_px * apix).round(3).tolist(),
        "correlation": round(res.score, 5),
        "correlation_low_res": round(res.score_medium, 5),
        "correlation_low_res_other_hand": (None if not np.isfinite(res.score_other_hand)
                                           else round(res.score_other_hand, 5)),
        "refinement_band_A": round(n * apix / res.band_limit, 3),
        "fsc_0.5_A": round(resolution_at(curve, n, apix, 0.5), 3),
        "fsc_0.143_A": round(resolution_at(curve, n, apix, 0.143), 3),
        "nyquist_A": round(2 * apix, 3),
        "fsc_curve": [[int(i), (None if not np.isfinite(shells[i]) else round(float(shells[i]), 3)),
                       round(float(c), 5)] for i, c in enumerate(curve)],
        "convention": "aligned(r) = m(R^T (r - t)) about voxel N//2; m = z-flipped map if mirror",
    }
    if pose_result is not None:
        # consistency of the two alignments: the map rotation R equals the pose-set rotation H
        # (A_est ~ A_true H) for the same hand, and M H M for the mirrored one (docs in pose_error.py)
        H = np.asarray(pose_result["global_rotation"])
        if pose_result["mirror"]:
            H = MIRROR @ H @ MIRROR
        gap = geodesic_distance_deg(torch.as_tensor(H), torch.as_tensor(res.rotation))  # angle of H^T R
        pose_result["map_vs_pose_rotation_deg"] = round(float(gap), 3)
        pose_result["same_hand_as_map"] = bool(pose_result["mirror"] == res.mirror)
        out["poses"] = pose_result
    if args.o_aligned:
        from cryospin_relion.io.mrc import write_mrc

        write_mrc(args.o_aligned, aligned, apix)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(out, indent=2)
    if args.json:
        from cryospin_relion.io.atomic import write_text

        write_text(args.json, text + "\n")
    if not args.quiet:
        print(text)
    return 0
