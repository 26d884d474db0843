"""Project a map at the poses (angles, origins) and optionally CTFs of a particle file.

Examples:
  cryospin project --map run_class001.mrc --i run_data.star --o proj.mrcs
  cryospin project --map map.mrc --i run_data.star --o sim.mrcs --ctf --noise-snr 0.1 --seed 1

cryoSPIN's forward model, the same as RELION's relion_project --ang (with
--ctf): image = IFFT(CTF * slice(FFT(map))) shifted by minus the origin. Writes
the stack (voxel size = the file's pixel size) and a matching particle STAR
next to it (out.star, rlnImageName pointing at out.mrcs as given by --o).
The map box must equal the particles' image box, and the map is taken to have
the particles' pixel size (a different header voxel size gives a warning).
--noise-snr adds white Gaussian noise of variance (mean image variance) / SNR.
Note: for odd boxes relion_project's images sit 1 px further in +x and +y.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cryospin_relion.device import DEVICE_CHOICES, resolve_device
from cryospin_relion.errors import InputError
from cryospin_relion.geometry.ctf import CTF, ctf_2d, projection_factor
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.shifts import origin_to_translation
from cryospin_relion.geometry.slicing import volume_to_projector
from cryospin_relion.io.atomic import ensure_writable_dir
from cryospin_relion.io.mrc import read_mrc, write_stack
from cryospin_relion.io.particles import ParticleTable
from cryospin_relion.io.overwrite import refuse_overwriting
from cryospin_relion.io.read import read_particles, write_particles


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", required=True, metavar="MAP", help="map to project (.mrc)")
    parser.add_argument("--i", required=True, metavar="IN", help="particles with poses (.star or .cs)")
    parser.add_argument("--o", required=True, metavar="OUT", help="output stack (.mrcs); the STAR goes next to it")
    parser.add_argument("--ctf", action="store_true", help="apply the particles' CTFs")
    parser.add_argument("--noise-snr", dest="noise_snr", type=float, default=None,
                        help="add white Gaussian noise at this signal-to-noise ratio (variance ratio)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--angpix", type=float, default=None, help="pixel size in A, used only when the input has none")
    parser.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                        help="compute device: auto (CUDA when present), cpu or cuda (default cpu)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def project_table(vol: np.ndarray, table: ParticleTable, use_ctf: bool, device: torch.device,
                  batch: int = 256, progress: bool = False) -> np.ndarray:
    """(N, n, n) float32 projections of ``vol`` (n, n, n) at the table's poses (and CTFs).

    The volume's voxel size is taken to be each particle's ``table.apix``.
    """
    n = vol.shape[-1]
    spec = volume_to_projector(torch.as_tensor(vol, dtype=torch.float32, device=device))
    N = len(table)
    out = np.empty((N, n, n), dtype=np.float32)
    ctf = CTF.from_arrays(table.ctf).to(device) if use_ctf else None
    from cryospin_relion.console import progress_bar

    with progress_bar(N, "projecting", "img", enabled=progress) as bar:
        for a in range(0, N, batch):
            r = np.arange(a, min(a + batch, N))
            apix = torch.as_tensor(table.apix[r], dtype=torch.float32, device=device)
            rot = torch.as_tensor(table.rotations[r], dtype=torch.float32, device=device)
            t = origin_to_translation(torch.as_tensor(table.shifts_A[r], dtype=torch.float32, device=device), apix)
            cr = None if ctf is None else ctf[torch.as_tensor(r, device=device)]
            # the factor the images carry: CTF^2 for optics groups flagged rlnCtfDataAreCtfPremultiplied
            c = None if cr is None else projection_factor(ctf_2d(n, apix, cr), cr)
            out[r] = project_spectrum(spec, rot, n, t, c).cpu().numpy()
            bar.update(len(r))
    return out


def _retarget(table: ParticleTable, stack_name: str, box: int) -> ParticleTable:
    """The table with image i at index i of ``stack_name`` (rlnImageName rewritten)."""
    n = len(table)
    names = np.array([f"{i + 1:06d}@{stack_name}" for i in range(n)], dtype=object)
    raw = table.raw
    if isinstance(raw, dict) and raw.get("particles") is not None:
        raw = {**raw, "particles": raw["particles"].assign(rlnImageName=names)}
    extra = {**table.extra, "stack_names": np.full(n, stack_name, dtype=object)}
    return replace(table, stack_paths=np.full(n, stack_name, dtype=object), stack_indices=np.arange(n, dtype=np.int64),
                   box=box, raw=raw, extra=extra, sign=1.0)


def main(args: argparse.Namespace) -> int:
    out = Path(args.o)
    if out.suffix.lower() not in (".mrcs", ".mrc"):
        raise InputError(f"{out}: --o: the output stack must end in .mrcs")
    star_out = out.with_suffix(".star")
    if args.noise_snr is not None and not (args.noise_snr > 0 and np.isfinite(args.noise_snr)):
        raise InputError(f"--noise-snr {args.noise_snr}: must be a positive number")
    if args.batch < 1:
        raise InputError(f"--batch {args.batch}: must be at least 1")
    device = resolve_device(args.device)
    vol, voxel = read_mrc(args.map)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"{args.map}: nx/ny/nz: need a cubic 3D map, got {vol.shape[::-1]}")
    table = read_particles(args.i, angpix=args.angpix, no_ctf=not args.ctf, check_stacks=False)
    if not table.has_poses:
        raise InputError(f"{args.i}: rlnAngleRot: no poses in this file (project needs angles)")
    refuse_overwriting({"--o": [out, star_out]}, {"--map": [args.map], "--i": [args.i]})
    n = vol.shape[-1]
    if table.box and table.box != n:
        raise InputError(f"{args.map}: box {n} differs from the image size {table.box} of {args.i} "
                         f"(rlnImageSize); resample the map first")
    apix = np.asarray(table.apix, dtype=np.float64)
    if apix.max() > apix.min() * 1.001:
        raise InputError(f"{args.i}: rlnImagePixelSize: particles have different pixel sizes "
                         f"({apix.min():g} to {apix.max():g} A); project them separately")
    if voxel is not None and abs(voxel - apix[0]) > 1e-3 * apix[0]:
        print(f"cryospin project: warning: {args.map}: header voxel size {voxel:g} A differs from the "
              f"particles' pixel size {apix[0]:g} A; using {apix[0]:g} A", file=sys.stderr)
    ensure_writable_dir(out)

    images = project_table(vol, table, args.ctf, device, args.batch, progress=not args.quiet)
    if args.noise_snr is not None:
        signal_var = float(images.var(axis=(1, 2), dtype=np.float64).mean())
        sigma = np.sqrt(signal_var / args.noise_snr)
        rng = np.random.default_rng(args.seed)
        for a in range(0, len(images), 1024):
            images[a : a + 1024] += rng.normal(0.0, sigma, size=images[a : a + 1024].shape).astype(np.float32)
    write_stack(out, images, float(apix[0]))
    write_particles(_retarget(table, str(args.o), n), star_out)
    noise = f", noise SNR {args.noise_snr:g}" if args.noise_snr is not None else ""
    print(f"wrote {len(table)} projections ({'with' if args.ctf else 'no'} CTF{noise}) to {out} and {star_out}")
    return 0
