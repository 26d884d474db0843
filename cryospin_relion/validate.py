"""Check a run's inputs before computing, reporting every problem at once.

``cryospin abinit --dry-run`` prints these problems and exits 2; ``abinit`` runs
the same checks at start. Each problem is one line naming the file, the row
where it applies, and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cryospin_relion.errors import InputError, InputErrors
from cryospin_relion.io.particles import ParticleTable
from cryospin_relion.io.paths import stack_problems

# relative spread of pixel sizes that one volume can absorb (rounding in STAR files)
APIX_TOLERANCE = 1e-3


class Problems(list[str]):
    """The problems of a run's inputs, one line each (any one refuses the run), and its
    ``warnings``: one line each about inputs that are usable but probably not meant
    (the run goes on; commands print or log them as ``warning: ...``)."""

    def __init__(self, problems: Iterable[str] = (), warnings: Iterable[str] = ()):
        super().__init__(problems)
        self.warnings: list[str] = list(warnings)


def table_warnings(table: ParticleTable) -> list[str]:
    """Warnings (one line each) about a readable particle table: all defoci negative
    (RELION's underfocus is positive: usually a sign mix-up in a converted file)."""
    out: list[str] = []
    c = table.ctf
    if c is not None and len(table):
        df = np.concatenate([np.asarray(c.defocus_u, dtype=np.float64), np.asarray(c.defocus_v, dtype=np.float64)])
        if (df < 0).all():
            field = "ctf/df1_A" if table.source_format == "cs" else "rlnDefocusU"
            out.append(f"{table.source_file}: {field}: all defoci are negative ({df.min():.0f} to {df.max():.0f} A); "
                       f"underfocus is positive in RELION and cryoSPARC: a sign mix-up in a converted file?")
    return out


def _image_field(table: ParticleTable) -> str:
    return "blob/path" if table.source_format == "cs" else "rlnImageName"


def pixel_size_problem(table: ParticleTable) -> str | None:
    """A message when the particles do not share one pixel size (one map needs one), else None."""
    a = np.asarray(table.apix, dtype=np.float64)
    if len(a) and a.max() > a.min() * (1 + APIX_TOLERANCE):
        groups = pd.Series(a).groupby(np.asarray(table.optics_group)).first()
        desc = ", ".join(f"group {g}: {v:.4g} A" for g, v in groups.items())
        field = "blob/psize_A" if table.source_format == "cs" else "rlnImagePixelSize"
        return f"{table.source_file}: {field}: particles have different pixel sizes ({desc}); one map needs one pixel size"
    return None


def _sample_rows(found: np.ndarray, sample: int) -> np.ndarray:
    rows = np.flatnonzero(found)
    if len(rows) <= sample:
        return rows
    return rows[np.linspace(0, len(rows) - 1, sample).round().astype(np.int64)]


def image_problems(table: ParticleTable, rows: np.ndarray) -> list[str]:
    """NaN/inf images among ``rows``, one message per bad image, and one per unreadable stack
    (a truncated or damaged stack is one problem, not one per particle in it)."""
    from cryospin_relion.data.stack import ImageSource
    from cryospin_relion.io.mrc import open_stack

    problems: list[str] = []
    if len(rows) == 0:
        return problems
    sub = table.subset_rows(rows)  # a table of found stacks only
    paths = np.asarray(sub.stack_paths).astype(str)
    unreadable = []
    for p in pd.unique(paths):
        try:
            open_stack(p)
        except InputError as e:
            problems.append(str(e))
            unreadable.append(p)
    good = np.flatnonzero(~np.isin(paths, unreadable))
    if len(good) == 0:
        return problems
    src = ImageSource(sub.subset_rows(good))
    for r in range(len(good)):
        try:
            src.images(np.array([r]))
        except InputError as e:
            if str(e) not in problems:
                problems.append(str(e))
    return problems


def check_particles(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    datadir: str | os.PathLike | None = None,
    angpix: float | None = None,
    no_ctf: bool = False,
    sample: int = 64,
) -> tuple[ParticleTable | None, Problems]:
    """Read and check a particle file; returns the table (None if unreadable) and all problems,
    with the warnings in ``problems.warnings`` (``require_valid(table, problems)`` ignores them).

    Checks: the file reads (STAR/.cs structure, pixel size, CTF columns unless
    ``no_ctf``, one box), every stack exists, is readable and holds the indexed
    images, the images are square and of the declared box, one pixel size, at
    least two particles, a sample of ``sample`` images has no NaN/inf, the output
    folder is writable. Warnings: ``table_warnings``.
    """
    from cryospin_relion.io.read import read_particles

    problems = Problems()
    if out_dir is not None:
        problems += _output_problems(Path(out_dir))
    try:
        table = read_particles(path, datadir=datadir, angpix=angpix, no_ctf=no_ctf, check_stacks=False)
    except InputError as e:
        problems += str(e).splitlines()
        return None, problems
    problems.warnings += table_warnings(table)
    field = _image_field(table)
    if len(table) < 2:
        problems.append(f"{path}: {field}: at least 2 particles are needed (found {len(table)})")
    codes, uniq = pd.factorize(pd.Series(table.stack_paths, dtype=object).astype(str), sort=False)
    # stack_paths hold resolved paths, or the name as written when the stack was not found
    resolved = [u if os.path.isfile(u) else None for u in uniq]
    bad_stacks: set[str] = set()
    problems += list(stack_problems(list(uniq), resolved, codes, np.asarray(table.stack_indices), str(path), field,
                                    int(table.box) or None, datadir is not None, bad_stacks=bad_stacks))
    p = pixel_size_problem(table)
    if p:
        problems.append(p)
    found = np.isin(codes, [k for k, r in enumerate(resolved) if r is not None and r not in bad_stacks])
    if found.any() and not any("past the end" in q for q in problems):
        problems += image_problems(table, _sample_rows(found, sample))
    return table, problems


def _output_problems(out: Path) -> list[str]:
    # (a file in the way of the folder is refused by the command before it creates the folder)
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{out}: --o: output folder is not writable"]
    return []


def require_valid(table: ParticleTable | None, problems: list[str], show: int = 50) -> ParticleTable:
    """Raise all problems at once (exit code 2; the first ``show`` lines and a count), else return the table."""
    if problems:
        more = len(problems) - show
        raise InputErrors(problems[:show] + ([f"... and {more} more problems of the same kinds"] if more > 0 else []))
    assert table is not None
    return table
