"""No output ever replaces an input: the check every command makes before any work.

An output replaces an input when both name the same file: the same path after
resolving links and ``..``, or, when both exist, the same file on disk (hard links,
bind mounts). Inputs are the files the user named and the files they refer to
(the stacks of a particle file); outputs are every file a command may write.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryospin_relion.errors import InputErrors


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether paths ``a`` and ``b`` name one file (existing or not)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def overwrite_problems(outputs: Mapping[str, Iterable[str | os.PathLike]],
                       inputs: Mapping[str, Iterable[str | os.PathLike]]) -> list[str]:
    """One line per output that would replace an input.

    Args:
        outputs: flag (e.g. ``--o``) -> the paths it makes the command write.
        inputs: what the input is (e.g. ``--i``, ``--i (stack)``) -> its paths.
    """
    ins = [(what, Path(p)) for what, paths in inputs.items() for p in paths]
    by_name: dict[str, list[tuple[str, Path]]] = {}
    for what, p in ins:  # compare only paths with the same file name (outputs have fixed names): fast
        by_name.setdefault(p.name, []).append((what, p))
    problems = []
    for flag, paths in outputs.items():
        for out in map(Path, paths):
            for what, inp in by_name.get(out.name, []):
                if same_file(out, inp):
                    problems.append(f"{out}: {flag}: would replace the input {inp} ({what}); choose another {flag}")
    return list(dict.fromkeys(problems))


def refuse_overwriting(outputs: Mapping[str, Iterable[str | os.PathLike]],
                       inputs: Mapping[str, Iterable[str | os.PathLike]]) -> None:
    """InputErrors (exit 2) when an output would replace an input; nothing is written."""
    problems = overwrite_problems(outputs, inputs)
    if problems:
        raise InputErrors(problems)
