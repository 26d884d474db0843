"""Convert particle metadata between RELION STAR and cryoSPARC .cs (poses, shifts, CTF, halves).

Examples:
  cryospin convert --i J24/J24_particles.cs --o particles.star
  cryospin convert --i Refine3D/job010/run_data.star --o particles.cs
  cryospin convert --i old_30.star --o new_31.star      (RELION 3.0 -> 3.1 layout)

The image stacks are not read and need not exist: stack paths are copied as the
input gives them (project-relative), so use the output from the same project
folder. A STAR file cannot record cryoSPARC's ``blob/sign``: images with dark
protein (sign -1) stay dark, and a warning says so.
"""

from __future__ import annotations

import argparse
import sys

from cryospin_relion.io.overwrite import refuse_overwriting
from cryospin_relion.io.read import particle_format, read_particles, write_particles


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="IN", help="input particles (.star or .cs)")
    parser.add_argument("--o", required=True, metavar="OUT", help="output particles (.star or .cs)")
    parser.add_argument("--datadir", default=None, help="extra folder to look for image stacks in")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixel size in A, used only when the input has none")
    parser.add_argument("--no-ctf", dest="no_ctf", action="store_true",
                        help="accept input without CTF parameters (and ignore any CTF)")
    parser.add_argument("--check-stacks", dest="check_stacks", action="store_true",
                        help="require every image stack to exist and hold the indexed images")


def main(args: argparse.Namespace) -> int:
    particle_format(args.o)  # refuse an unknown output type before reading anything
    table = read_particles(args.i, datadir=args.datadir, angpix=args.angpix, no_ctf=args.no_ctf,
                           check_stacks=args.check_stacks)
    refuse_overwriting({"--o": [args.o]},
                       {"--i": [args.i], "--i (image stack)": sorted(set(map(str, table.stack_paths)))})
    if not table.box:
        print(f"cryospin convert: warning: image size unknown (no rlnImageSize and no stack found); "
              f"pass --datadir to read it from the stacks", file=sys.stderr)
    if table.sign < 0 and particle_format(args.o) == "star":
        print(f"cryospin convert: warning: blob/sign = {table.sign:g}: these images have dark protein, and a "
              f"STAR file cannot say so; RELION expects white protein (invert the stacks, or pass --invert "
              f"to cryospin when using this STAR)", file=sys.stderr)
    write_particles(table, args.o)
    poses = "with poses" if table.has_poses else "without poses"
    print(f"wrote {len(table)} particles ({poses}) to {args.o}")
    return 0
