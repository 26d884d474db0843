"""Reconstruct a map from particles with known poses (half maps, full map, FSC).

Examples:
  cryospin reconstruct --i Refine3D/job010/run_data.star --o recon
  cryospin reconstruct --i J24_particles.cs --o recon --box 128 --device cuda

Direct Fourier inversion with CTF correction (Wiener filter), like
relion_reconstruct --ctf, using the angles and origins in the file (images of
optics groups with rlnCtfDataAreCtfPremultiplied 1 already carry one CTF factor
and are backprojected as they are; --ctf-phase-flipped for phase-flipped images). Writes
DIR/half1_map.mrc and DIR/half2_map.mrc (halves from rlnRandomSubset or
cryoSPARC's alignments3D/split, else a seeded random balanced split),
DIR/map.mrc (all particles) and DIR/fsc.txt (shell, resolution in A, FSC), and
prints the resolution where the half-map FSC drops below 0.143 (no solvent mask).
As relion_reconstruct does, every map is flattened outside a sphere of
diameter = box (3 px raised-cosine edge) to suppress corner noise.
With --box smaller than the images they are Fourier-cropped and the voxel size
grows accordingly.
With --sym (RELION's point-group names and axes, e.g. C4, D7, T, O, I; as
relion_reconstruct --sym) every image also counts at each of its
symmetry-equivalent poses A @ S, so the half maps and the map are symmetric
(as RELION does, the Fourier sums are resampled once per operator).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from cryospin_relion.device import DEVICE_CHOICES, resolve_device
from cryospin_relion.errors import InputError
from cryospin_relion.halfmaps import output_apix, reconstruct_halves
from cryospin_relion.io.atomic import ensure_writable_dir
from cryospin_relion.io.fsc_table import write_fsc
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.overwrite import refuse_overwriting
from cryospin_relion.io.particles import ParticleTable
from cryospin_relion.io.read import read_particles
from cryospin_relion.validate import table_warnings

OUTPUTS = ("half1_map.mrc", "half2_map.mrc", "map.mrc", "fsc.txt")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="IN", help="particles with poses (.star or .cs)")
    parser.add_argument("--o", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--box", type=int, default=None, help="output box in pixels (default: the image box)")
    parser.add_argument("--j", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                        help="compute device: auto (CUDA when present), cpu or cuda (default cpu)")
    parser.add_argument("--datadir", default=None, help="extra folder to look for image stacks in")
    parser.add_argument("--angpix", type=float, default=None, help="pixel size in A, used only when the input has none")
    parser.add_argument("--no-ctf", dest="no_ctf", action="store_true", help="no CTF correction (and none required)")
    parser.add_argument("--ctf-phase-flipped", dest="ctf_phase_flipped", action="store_true",
                        help="the images' CTF phases are already flipped: correct with |CTF| (as relion_reconstruct "
                             "--ctf_phase_flipped)")
    parser.add_argument("--tau", type=float, default=1e-3,
                        help="Wiener constant, relative to the mean CTF^2 weight (default 1e-3)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images read at a time (default: 32 M pixels' worth, 8192 at box 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half split when the input has none")
    parser.add_argument("--no-outside-mask", dest="outside_mask", action="store_false",
                        help="do not flatten the maps outside a sphere of diameter = box (relion_reconstruct does)")
    parser.add_argument("--sym", default="C1",
                        help="point group in RELION's frame: C1, Cn, Dn, T, O, I (= I2) or I1..I4 (default C1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_output_dir(path: Path) -> None:
    """InputError unless ``path`` is, or can be created as, a writable folder (creates nothing)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: --o: exists and is not a folder")
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"{path}: --o: folder '{p}' is not writable")


def halves_problem(path: str, table: ParticleTable, halves: np.ndarray) -> str | None:
    """A message when a half set has fewer than 2 particles (its map, and the FSC, would mean nothing), else None.

    Args:
        halves: (N,) 1 / 2, as ``table.halves(seed)`` gives them.
    """
    counts = {h: int((halves == h).sum()) for h in (1, 2)}
    if min(counts.values()) >= 2:
        return None
    field = "alignments3D/split" if table.source_format == "cs" else "rlnRandomSubset"
    if table.subset is not None and np.array_equal(np.asarray(table.subset), halves):
        h = 1 if counts[1] < 2 else 2
        return (f"{path}: {field}: half {h} has {counts[h]} particle{'s' if counts[h] != 1 else ''}; each half "
                f"needs at least 2 (fix {field}, or remove it for a random split)")
    why = "none in the file" if table.subset is None else "not a split into 1 and 2"
    return (f"{path}: {field}: {why}, and a random half split of {len(table)} particle{'s' if len(table) != 1 else ''} "
            f"gives {counts[1]} / {counts[2]}; each half needs at least 2 particles (4 in all)")


def main(args: argparse.Namespace) -> int:
    if args.box is not None and args.box < 8:
        raise InputError(f"--box {args.box}: must be at least 8")
    if args.j is not None and args.j < 1:
        raise InputError(f"--j {args.j}: must be at least 1")
    if not args.tau > 0:
        raise InputError(f"--tau {args.tau}: must be > 0")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch}: must be at least 1")
    from cryospin_relion.geometry.symmetry import parse_symmetry, symmetry_operators

    sym = parse_symmetry(args.sym)
    device = resolve_device(args.device)
    out = Path(args.o)
    _check_output_dir(out)

    table = read_particles(args.i, datadir=args.datadir, angpix=args.angpix, no_ctf=args.no_ctf, check_stacks=True)
    refuse_overwriting({"--o": [out / f for f in OUTPUTS]},
                       {"--i": [args.i], "--i (image stack)": sorted(set(map(str, table.stack_paths)))})
    if not table.has_poses:
        raise InputError(f"{args.i}: rlnAngleRot: no poses in this file (reconstruct needs angles; "
                         f"for cryoSPARC, alignments3D/pose)")
    table = table.with_ctf_phase_flipped(args.ctf_phase_flipped)
    problem = halves_problem(args.i, table, table.halves(args.seed))
    if problem:
        raise InputError(problem)
    for w in table_warnings(table):
        print(f"cryospin reconstruct: warning: {w}", file=sys.stderr, flush=True)
    from cryospin_relion.data.stack import ImageSource

    src = ImageSource(table)
    box = args.box or src.box
    if box > src.box:
        raise InputError(f"{args.i}: --box {box} is larger than the particle images ({src.box} px)")
    apix = output_apix(table, box, src.box)
    if args.j is not None:
        torch.set_num_threads(args.j)

    ctf_note = "no CTF" if (args.no_ctf or table.ctf is None) else "CTF-corrected"
    if table.ctf is not None and not args.no_ctf:
        pre = 0 if table.ctf.premultiplied is None else int(table.ctf.premultiplied.sum())
        ctf_note += f", {pre} CTF-premultiplied images" if pre else ""
        ctf_note += ", phase-flipped images" if table.ctf.phase_flipped and pre < len(table) else ""
    sym_note = "" if sym == "C1" else f", symmetry {sym} ({len(symmetry_operators(sym))} operators)"
    print(f"reconstructing {len(table)} particles ({ctf_note}) at {box} px, {apix:.4g} A/px{sym_note}", flush=True)
    res = reconstruct_halves(src, table, box=box, use_ctf=not args.no_ctf, tau=args.tau, batch_size=args.batch,
                             device=device, threads=args.j, seed=args.seed, mask_outside=args.outside_mask,
                             progress=not args.quiet, symmetry=None if sym == "C1" else symmetry_operators(sym))

    ensure_writable_dir(out / "map.mrc")
    write_mrc(out / "half1_map.mrc", res.half1, apix)
    write_mrc(out / "half2_map.mrc", res.half2, apix)
    write_mrc(out / "map.mrc", res.map, apix)
    write_fsc(out / "fsc.txt", res.fsc, box, apix)
    n1 = int((table.halves(args.seed) == 1).sum())
    print(f"halves: {n1} / {len(table) - n1} particles")
    print(f"wrote {', '.join(str(out / f) for f in OUTPUTS)}")
    print(f"resolution at FSC 0.143: {res.resolution:.2f} A (half maps without a solvent mask; Nyquist {2 * apix:.2f} A)")
    sys.stdout.flush()
    return 0
