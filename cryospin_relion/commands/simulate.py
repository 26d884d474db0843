"""Simulate a particle dataset (RELION STAR + stack) from a map or an atomic model.

Random uniform rotations, CTF with random defocus and astigmatism, Gaussian
shifts and white noise at a given SNR, through the project's forward model
(equal to RELION's relion_project). Writes into --o:

  particles.star     RELION 3.1 (data_optics + data_particles) with the TRUE poses
                     (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst), CTFs and a balanced
                     rlnRandomSubset; rlnImageName = N@particles.mrcs, relative to
                     the STAR's folder (the reader tries the working directory
                     first, as RELION does, then the STAR's folder)
  particles.mrcs     the images, protein-positive, voxel size set
  ground_truth.mrc   the map the images were made from (box, pixel size of the images)

SNR = var(noise-free images, all pixels) / var(noise). With noise, images and
ground truth are divided by the noise sigma together, so the noise std is 1 and
images = projections of ground_truth.mrc + N(0, 1). --snr inf gives no noise.

A --map is resampled to --box/--apix (Fourier crop or pad by the voxel-size
ratio, centre voxel N//2 kept). A --model (.pdb/.cif) is turned into an
electron-scattering density with gemmi, centred on its centre of mass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cryospin_relion.errors import InputError


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--map", help="input map (.mrc); resampled to --box at --apix")
    src.add_argument("--model", help="input atomic model (.pdb, .cif, .ent); density computed with gemmi")
    p.add_argument("--o", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of particles (default 1000)")
    p.add_argument("--box", type=int, required=True, help="image side in pixels")
    p.add_argument("--apix", type=float, required=True, help="pixel size of the images in A")
    p.add_argument("--map-apix", type=float, default=None,
                   help="voxel size of --map in A (when its header has none, or to override it)")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal-to-noise ratio var(signal)/var(noise) (default 0.1; inf = no noise)")
    p.add_argument("--defocus-min", type=float, default=10000.0, help="min mean defocus in A (default 10000)")
    p.add_argument("--defocus-max", type=float, default=25000.0, help="max mean defocus in A (default 25000)")
    p.add_argument("--astigmatism", type=float, default=500.0, help="max |DefocusU - DefocusV| in A (default 500)")
    p.add_argument("--shift-std", type=float, default=2.0, help="std of the origins in pixels per axis (default 2)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm (default 2.7)")
    p.add_argument("--amp-contrast", type=float, default=0.1, help="amplitude contrast (default 0.1)")
    p.add_argument("--no-ctf", action="store_true", help="no CTF (and no CTF columns in the STAR)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", default=None, help="also write the summary JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary on stdout")


def check_args(args) -> None:
    if args.n < 1:
        raise InputError(f"--n: need at least 1 particle (got {args.n})")
    if args.box < 8:
        raise InputError(f"--box: need at least 8 pixels (got {args.box})")
    if not (args.apix > 0 and math.isfinite(args.apix)):
        raise InputError(f"--apix: must be > 0 (got {args.apix})")
    if args.map_apix is not None and not args.map_apix > 0:
        raise InputError(f"--map-apix: must be > 0 (got {args.map_apix})")
    if math.isnan(args.snr) or args.snr <= 0:
        raise InputError(f"--snr: must be > 0 (got {args.snr}); use inf for no noise")
    if not 0 <= args.defocus_min <= args.defocus_max:
        raise InputError(f"--defocus-min/--defocus-max: need 0 <= min <= max (got {args.defocus_min}, "
                         f"{args.defocus_max})")
    if args.shift_std < 0 or args.astigmatism < 0:
        raise InputError("--shift-std/--astigmatism: must be >= 0")
    if not 0 <= args.amp_contrast < 1:
        raise InputError(f"--amp-contrast: must be in [0, 1) (got {args.amp_contrast})")


def main(args) -> int:
    from cryospin_relion.evaluate.simulate import SimulationConfig, load_map, model_to_map, write_dataset

    check_args(args)
    from cryospin_relion.io.overwrite import refuse_overwriting

    out = Path(args.o)
    refuse_overwriting({"--o": [out / n for n in ("particles.star", "particles.mrcs", "ground_truth.mrc")],
                        "--json": [args.json] if args.json else []},
                       {"--map" if args.map else "--model": [args.map or args.model]})
    if args.map:
        vol = load_map(args.map, args.box, args.apix, args.map_apix)
    else:
        vol = model_to_map(args.model, args.box, args.apix)
    cfg = SimulationConfig(
        n=args.n, snr=args.snr, defocus_min=args.defocus_min, defocus_max=args.defocus_max,
        astigmatism=args.astigmatism, shift_std=args.shift_std, voltage=args.voltage, cs=args.cs,
        amp_contrast=args.amp_contrast, ctf=not args.no_ctf, seed=args.seed,
    )
    summary = write_dataset(args.o, vol, args.apix, cfg, progress=not args.quiet and args.n >= 2000)
    summary["source"] = args.map or args.model
    text = json.dumps(summary, indent=2, default=str)
    if args.json:
        from cryospin_relion.io.atomic import write_text

        write_text(args.json, text + "\n")
    if not args.quiet:
        print(text)
    sys.stdout.flush()
    return 0
