"""Finding the image stacks that a STAR or .cs file points to.

Resolution order for a relative stack path (RELION paths are project-relative):
1. the current working directory, 2. the folder of the STAR/.cs file,
3. ``datadir``, then ``datadir`` + the file name alone. An absolute path is used
as is, else looked up by file name in ``datadir``.

All checks run once per unique stack, never per particle.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryospin_relion.errors import InputError
from cryospin_relion.io.mrc import open_stack, stack_shape


@dataclass
class StackLocation:
    """Where each particle's stack is.

    stack_paths: (N,) object str: absolute path of the stack, or the name as given
        when it was not found (only possible with ``check_stacks=False``).
    missing: stack names (as given) that were not found anywhere.
    shapes: {resolved path: (n, ny, nx)} for stacks whose header was read.
    """

    stack_paths: np.ndarray
    missing: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def box_from_headers(self) -> int:
        """Image side from the stack headers read (0 when none could be read)."""
        if not self.shapes:
            return 0
        return int(next(iter(self.shapes.values()))[2])


def resolve_one(name: str, source_dir: Path, datadir: str | os.PathLike | None) -> str | None:
    """Absolute path of an existing stack for ``name``, or None."""
    p = Path(name)
    cands: list[Path] = [] if p.is_absolute() else [Path.cwd() / p, source_dir / p]
    if p.is_absolute():
        cands.append(p)
    if datadir is not None:
        d = Path(datadir)
        if not p.is_absolute():
            cands.append(d / p)
        cands.append(d / p.name)
    for c in cands:
        if c.is_file():
            return os.path.abspath(c)
    return None


def searched(name: str, used_datadir: bool) -> str:
    """Where ``resolve_one`` looked for the stack ``name``, for a not-found message."""
    p = Path(name)
    if p.is_absolute():
        return "looked at that absolute path" + (f", and for '{p.name}' in --datadir" if used_datadir else "")
    return "looked in the working directory, next to the file" + (", and in --datadir" if used_datadir else "")


def locate_stacks(
    names: pd.Series,
    indices: np.ndarray,
    source_file: str,
    field_name: str,
    datadir: str | os.PathLike | None = None,
    check_stacks: bool = True,
    expected_box: int | None = None,
) -> StackLocation:
    """Resolve per-particle stack names and (optionally) check the stacks.

    Args:
        names: (N,) stack path per particle as written in the file.
        indices: (N,) 0-based image index in the stack.
        source_file: the STAR/.cs file (for messages and folder-relative lookup).
        field_name: the field the names came from (for messages).
        check_stacks: raise InputError for a missing stack, an index past its end,
            non-square images or a box different from ``expected_box`` / other stacks.
    """
    codes, uniq = pd.factorize(names.astype(str), sort=False)
    src_dir = Path(source_file).resolve().parent
    resolved = [resolve_one(u, src_dir, datadir) for u in uniq]
    missing = [u for u, r in zip(uniq, resolved) if r is None]
    shapes: dict[str, tuple[int, int, int]] = {}
    if check_stacks:
        first = next(stack_problems(list(uniq), resolved, codes, indices, source_file, field_name,
                                    expected_box, bool(datadir), shapes), None)
        if first is not None:
            raise InputError(first)
    paths = np.array([r if r is not None else u for u, r in zip(uniq, resolved)], dtype=object)
    return StackLocation(stack_paths=paths[codes], missing=missing, shapes=shapes)


def stack_problems(
    uniq: list[str],
    resolved: list[str | None],
    codes: np.ndarray,
    indices: np.ndarray,
    source_file: str,
    field_name: str,
    expected_box: int | None = None,
    used_datadir: bool = False,
    shapes: dict | None = None,
    bad_stacks: set | None = None,
) -> Iterator[str]:
    """One-line messages for every problem with the stacks, in file order (one per stack at most).

    Args:
        uniq: unique stack names as written in the file; resolved: their paths (None = not found).
        codes: (N,) index into ``uniq`` per particle; indices: (N,) 0-based image index.
        shapes: filled with {resolved path: (n, ny, nx)} for the headers read.
        bad_stacks: filled with the resolved paths of the stacks found but reported here.
    Yields:
        a missing stack, an unreadable one (header or data cut short, unknown mode),
        an index past a stack's end, non-square images, or a box different from
        ``expected_box`` / the first stack's.
    """
    shapes = {} if shapes is None else shapes
    bad_stacks = set() if bad_stacks is None else bad_stacks
    first_row = pd.Series(np.arange(len(codes))).groupby(codes).min().to_numpy()
    max_idx = pd.Series(indices).groupby(codes).max().to_numpy()
    box = expected_box
    for k, r in enumerate(resolved):
        row = first_row[k] + 1
        if r is None:
            yield (f"{source_file}: row {row}: {field_name}: stack '{uniq[k]}' not found "
                   f"({searched(uniq[k], used_datadir)})")
            continue
        try:
            n, ny, nx = open_stack(r).shape  # the header, and the data it promises are all there
        except InputError as e:
            bad_stacks.add(r)
            yield str(e)
            continue
        shapes[r] = (n, ny, nx)
        bad_stacks.add(r)  # until it passes every check below
        if ny != nx:
            yield f"{r}: nx/ny: non-square images {nx}x{ny} (from {source_file}, row {row})"
            continue
        if box and nx != box:
            yield f"{r}: nx: images are {nx} px but {source_file} says {box} ({field_name}, row {row})"
            continue
        box = box or nx
        if max_idx[k] < n:
            bad_stacks.discard(r)
        else:
            bad = int(np.flatnonzero((codes == k) & (indices >= n))[0])
            yield (f"{source_file}: row {bad + 1}: {field_name}: image {indices[bad] + 1} "
                   f"past the end of '{uniq[k]}' ({n} images)")


def first_header_box(loc: StackLocation) -> int:
    """Box from the first stack that exists (reads one header); 0 when none exists."""
    if loc.shapes:
        return loc.box_from_headers()
    missing = set(loc.missing)
    for p in pd.unique(loc.stack_paths):
        if p not in missing:
            n, ny, nx = stack_shape(p)
            return int(nx)
    return 0
