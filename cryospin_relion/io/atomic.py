"""Atomic file writes: write to a temporary file in the target folder, then rename.

A reader never sees a half-written output, and a failed or killed writer leaves
the previous file (if any) untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

from cryospin_relion.errors import InputError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create the parent folder of ``path`` if needed; InputError if it cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path}: output folder '{parent}' cannot be created ({e.strerror or e})") from None
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output folder '{parent}' is not writable")
    return parent


# the names atomic_path gives its temporary files
_TMP = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp(\.[^.]+)?")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix of ``path`` (libraries such as numpy
    choose the format from it). On an exception the temporary file is deleted
    and the exception propagates; ``path`` is not touched.
    """
    path = Path(path)
    ensure_writable_dir(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")  # see _TMP
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that ``atomic_path`` left in ``folder`` when a process was killed."""
    removed = []
    for p in Path(folder).glob(".*.tmp*"):
        if _TMP.fullmatch(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (numpy and torch scalars as floats)."""
    import json

    write_text(path, json.dumps(obj, indent=indent, default=float))
