"""Flip the hand of a map (mirror along z) and, optionally, of its poses.

The map's z axis is reversed about the centre voxel N//2 (RELION / cryoSPARC
convention: index i -> (N - i) mod N for even N, N - 1 - i for odd N). With
--poses, every pose A becomes M A M, M = diag(1, 1, -1) (origins unchanged),
so that projections of the flipped map at the flipped poses are the original
images: the flipped map and poses can go on to refinement together. Poses can
be a RELION STAR or a cryoSPARC .cs; every other column passes through.
"""

from __future__ import annotations

import argparse

from cryospin_relion.errors import InputError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, help="input map (.mrc)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--poses", default=None, help="poses to flip with the map (.star or .cs)")
    p.add_argument("--o-poses", default=None, help="output poses (.star or .cs)")


def main(args) -> int:
    import numpy as np

    from cryospin_relion.geometry.hand import flip_poses_hand, flip_volume_hand
    from cryospin_relion.io.mrc import read_mrc, write_mrc

    if (args.poses is None) != (args.o_poses is None):
        raise InputError("--poses/--o-poses: give both or neither")
    vol, voxel = read_mrc(args.i)
    if vol.ndim != 3:
        raise InputError(f"{args.i}: nz: not a 3D map (shape {tuple(vol.shape)[::-1]})")
    table = None
    if args.poses:
        from cryospin_relion.io.read import particle_format, read_particles

        particle_format(args.o_poses)  # fail early on a bad output extension
        try:
            table = read_particles(args.poses, check_stacks=False)
        except InputError as e:
            if "CTF" not in str(e):
                raise
            table = read_particles(args.poses, check_stacks=False, no_ctf=True)
        if table.rotations is None:
            raise InputError(f"{args.poses}: rlnAngleRot: no poses to flip")
    from cryospin_relion.io.overwrite import refuse_overwriting

    refuse_overwriting({"--o": [args.o], "--o-poses": [args.o_poses] if args.o_poses else []},
                       {"--i": [args.i], "--poses": [args.poses] if args.poses else []})
    write_mrc(args.o, flip_volume_hand(vol), voxel)
    if table is not None:
        from cryospin_relion.io.read import write_particles

        flipped = table.with_poses(flip_poses_hand(table.rotations), np.asarray(table.shifts_A))
        write_particles(flipped, args.o_poses)
    return 0
