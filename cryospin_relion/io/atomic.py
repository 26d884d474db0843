"""Atomic file writes: write to a temporary file in the target folder, then rename.

A reader never sees a half-written output, and a failed or killed writer leaves
the previous file (if any) untouched.
"""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix of ``path`` (libraries such as numpy
    choose the format from it). On an exception the temporary file is deleted
    and the exception propagates; ``path`` is not touched.
    """
    path = Path(path)
    ensure_writable_dir(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
