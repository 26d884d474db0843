"""Read / write particle metadata by file extension: ``.star`` (RELION) or ``.cs`` (cryoSPARC)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from cryospin_relion.errors import InputError
from cryospin_relion.io.particles import ParticleTable

__all__ = ["read_particles", "write_particles", "particle_format"]


def particle_format(path: str | os.PathLike) -> str:
    """'star' or 'cs' from the file name; InputError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        return "star"
    if suffix == ".cs":
        return "cs"
    raise InputError(f"{path}: unknown particle file type '{suffix}' (expected .star or .cs)")


def read_particles(
    path: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
    angpix: float | None = None,
    no_ctf: bool = False,
    check_stacks: bool = True,
) -> ParticleTable:
    """Particle table from a RELION STAR or cryoSPARC .cs file.

    Args:
        path: ``*.star`` or ``*.cs``.
        datadir: extra folder searched for image stacks (after the working
            directory and the folder of ``path``).
        angpix: pixel size [A] used only when the file has none.
        no_ctf: ignore CTF parameters (table.ctf = None) instead of requiring them.
        check_stacks: every stack must exist and hold the indexed images; with
            False, missing stacks are listed in ``table.extra["missing_stacks"]``.
    Raises:
        InputError: one line naming the file and field.
    """
    fmt = particle_format(path)
    if not Path(path).is_file():
        raise InputError(f"{path}: file not found")
    if angpix is not None and not (math.isfinite(angpix) and angpix > 0):
        raise InputError(f"{path}: --angpix: {angpix:g} is not a pixel size (a finite number of A > 0)")
    if fmt == "star":
        from cryospin_relion.io.star import read_star

        return read_star(path, datadir=datadir, angpix=angpix, no_ctf=no_ctf, check_stacks=check_stacks)
    from cryospin_relion.io.cs import read_cs

    return read_cs(path, datadir=datadir, angpix=angpix, no_ctf=no_ctf, check_stacks=check_stacks)


def write_particles(table: ParticleTable, path: str | os.PathLike) -> None:
    """Write ``table`` as RELION 3.1 STAR or cryoSPARC .cs (by extension), atomically."""
    if particle_format(path) == "star":
        from cryospin_relion.io.star import write_star

        write_star(table, path)
    else:
        from cryospin_relion.io.cs import write_cs

        write_cs(table, path)
