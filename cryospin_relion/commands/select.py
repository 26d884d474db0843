"""Keep the particles whose pose confidence is at least --min-score (and, optionally, of some classes).

The confidence is what `cryospin abinit` writes per particle: rlnMaxValueProbDistribution in
particles.star, cryospin/confidence in particles.cs (in [0, 1]; the run's log and logfile.pdf
suggest a cut-off). --classes keeps only the given classes: rlnClassNumber (STAR), or
alignments3D/class + 1 (.cs; cryoSPARC counts classes from 0, RELION from 1). Every table and
column of the input is kept as it is (optics groups too); only particle rows are dropped. The
output has the input's format (.star or .cs) and never replaces the input.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from cryospin_relion.errors import InputError
from cryospin_relion.io.particles import SCORE_COLUMNS

STAR_SCORE, CS_SCORE = SCORE_COLUMNS["confidence"]
STAR_CLASS, CS_CLASS = "rlnClassNumber", "alignments3D/class"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, help="particles (.star or .cs) with per-particle scores")
    p.add_argument("--o", required=True, help="selected particles (same format as --i)")
    p.add_argument("--min-score", required=True, type=float, metavar="X",
                   help=f"keep particles with confidence >= X ({STAR_SCORE} / {CS_SCORE})")
    p.add_argument("--classes", default=None, metavar="LIST",
                   help="also keep only these classes, e.g. 1,3 (RELION numbering, from 1)")


def parse_classes(text: str | None) -> list[int] | None:
    """'1,3' -> [1, 3]; None -> None; InputError on anything else."""
    if text is None:
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise InputError(f"--classes: '{text}' is not a comma-separated list of class numbers (e.g. 1,3)")
    return out


def select_rows(score: np.ndarray, min_score: float, classes: np.ndarray | None = None,
                keep_classes: list[int] | None = None) -> np.ndarray:
    """(N,) bool: score >= min_score (NaN never), and class in ``keep_classes`` when given."""
    with np.errstate(invalid="ignore"):
        keep = np.asarray(score, dtype=np.float64) >= min_score
    if keep_classes is not None:
        keep &= np.isin(np.asarray(classes), keep_classes)
    return keep


def _numbers(values, where: str) -> np.ndarray:
    import pandas as pd

    v = pd.to_numeric(pd.Series(np.asarray(values).reshape(len(values))), errors="coerce")
    bad = v.isna().to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where}: row {r + 1}: not a number ({np.asarray(values)[r]!r})")
    return v.to_numpy(dtype=np.float64)


def _select_star(src: Path, dst: Path, min_score: float, keep_classes: list[int] | None) -> tuple[int, int]:
    from cryospin_relion.io.star import load_star_blocks, particle_block_name, write_star_blocks

    blocks = load_star_blocks(src)
    key = particle_block_name(blocks, src)
    parts = blocks[key]
    if not hasattr(parts, "columns"):  # one particle written as label-value pairs
        import pandas as pd

        parts = pd.DataFrame({c: [x] for c, x in parts.items()})
    if STAR_SCORE not in parts.columns:
        raise InputError(f"{src}: {STAR_SCORE}: column missing (particles.star of a `cryospin abinit` run has it)")
    if keep_classes is not None and STAR_CLASS not in parts.columns:
        raise InputError(f"{src}: {STAR_CLASS}: column missing (--classes needs it)")
    score = _numbers(parts[STAR_SCORE], f"{src}: {STAR_SCORE}")
    classes = None if keep_classes is None else _numbers(parts[STAR_CLASS], f"{src}: {STAR_CLASS}")
    keep = _check_kept(select_rows(score, min_score, classes, keep_classes), score, src, min_score)
    blocks[key] = parts.loc[keep].reset_index(drop=True)
    write_star_blocks(blocks, dst)
    return int(keep.sum()), len(keep)


def _select_cs(src: Path, dst: Path, min_score: float, keep_classes: list[int] | None) -> tuple[int, int]:
    from cryospin_relion.io.cs import load_cs, save_cs

    ds = load_cs(src)
    fields = set(ds.fields())
    if CS_SCORE not in fields:
        raise InputError(f"{src}: {CS_SCORE}: field missing (particles.cs of a `cryospin abinit` run has it)")
    if keep_classes is not None and CS_CLASS not in fields:
        raise InputError(f"{src}: {CS_CLASS}: field missing (--classes needs it)")
    score = np.asarray(ds[CS_SCORE], dtype=np.float64)
    classes = None if keep_classes is None else np.asarray(ds[CS_CLASS], dtype=np.int64) + 1
    keep = _check_kept(select_rows(score, min_score, classes, keep_classes), score, src, min_score)
    save_cs(ds.take(np.flatnonzero(keep)), dst)
    return int(keep.sum()), len(keep)


def _check_kept(keep: np.ndarray, score: np.ndarray, src: Path, min_score: float) -> np.ndarray:
    if not keep.any():
        best = np.nanmax(score) if np.isfinite(score).any() else float("nan")
        raise InputError(f"{src}: --min-score: no particle kept (of {len(keep)}; highest confidence {best:.3g})")
    return keep


def main(args) -> int:
    from cryospin_relion.io.overwrite import refuse_overwriting
    from cryospin_relion.io.read import particle_format

    src, dst = Path(args.i), Path(args.o)
    fmt = particle_format(src)
    if particle_format(dst) != fmt:
        raise InputError(f"{dst}: --o: must be a .{fmt} file like --i (use `cryospin convert` to change format)")
    if not math.isfinite(args.min_score):
        raise InputError(f"--min-score: {args.min_score} is not a finite number")
    keep_classes = parse_classes(args.classes)
    if not src.is_file():
        raise InputError(f"{src}: --i: file not found")
    refuse_overwriting({"--o": [dst]}, {"--i": [src]})
    kept, total = (_select_star if fmt == "star" else _select_cs)(src, dst, args.min_score, keep_classes)
    what = f"confidence >= {args.min_score:g}" + ("" if keep_classes is None else
                                                  f", class in {','.join(map(str, keep_classes))}")
    print(f"cryospin select: kept {kept} of {total} particles ({what}) -> {dst}")
    return 0
