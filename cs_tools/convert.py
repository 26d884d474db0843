"""Plain functions between cryoSPARC Datasets, files on disk and ``cryospin abinit``.

Nothing here talks to a cryoSPARC server (that is ``cs_tools/server.py``), so
every function can be tested on real ``.cs`` files without one.

cryoSPARC conventions used (see docs/conventions.md and docs/cryosparc.md):

- particle poses: the ``ALIGN_FIELDS`` (``alignments3D/pose``, ``shift``, ``psize_A``,
  ``split``), encoded from RELION poses by ``cryospin_relion.io.cs.alignments_fields``,
  the code (and the stated conventions) that ``cryospin`` writes its own ``.cs`` files with.
- volume outputs: one row with ``<slot>/path`` (project-relative), ``<slot>/shape``
  (uint32 (3,), z, y, x) and ``<slot>/psize_A`` (float32) for the slots ``map``,
  ``map_half_A`` (half 1) and ``map_half_B`` (half 2).
- ``blob/path`` in an exported ``.cs`` may start with ``>``: relative to the
  project folder. Paths in a job's own ``.cs`` are relative to the project folder too.
- K classes (``cryospin abinit --classes K``): the particles' class is ``alignments3D/class``
  (u4, 0-based; with ``class_posterior`` and ``class_ess`` 1.0, io/particles.py ``CS_CLASS_FIELDS``),
  or ``rlnClassNumber`` - 1 of particles.star; class k's maps are in ``class{k+1:03d}/``. The job's
  outputs per class are named as cryoSPARC's own ab-initio and heterogeneous refinement name theirs,
  0-based like ``alignments3D/class``: ``volume_class_0``, ``particles_class_0``, ... (``class_output_names``).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np
from cryosparc.dataset import Dataset

from cryospin_relion.cli import command_argv
from cryospin_relion.errors import InputError
from cryospin_relion.io.cs import ALIGN_FIELDS, alignments_fields, load_cs, project_paths, set_alignments
from cryospin_relion.io.particles import CS_CLASS_FIELDS, SCORE_COLUMNS, STAR_CLASS

__all__ = [
    "ALIGN_FIELDS",
    "VOLUME_SLOTS",
    "INPUT_SLOTS",
    "parse_output_ref",
    "stack_paths",
    "localize_blob_paths",
    "check_input_dataset",
    "alignments_fields",
    "particles_output",
    "particles_output_from_result",
    "fill_allocated",
    "expected_voxel_size",
    "volume_info",
    "volume_output",
    "AbinitOutputs",
    "ClassOutputs",
    "abinit_outputs",
    "class_output_names",
    "particle_classes",
    "result_particles",
    "abinit_command",
    "run_command",
]

# neutral values for other alignments3D fields a server-allocated output may have
ALIGN_DEFAULTS = {
    "alignments3D/class_posterior": 1.0,
    "alignments3D/weight": 1.0,
    "alignments3D/alpha": 1.0,
    "alignments3D/alpha_min": 1.0,
    "alignments3D/class": 0,
}

# input particle slots of the external job: blob and ctf required, alignments3D optional
INPUT_SLOTS = ["blob", "ctf", "?alignments3D"]

# volume output slots -> abinit file names (map_half_A = half 1, map_half_B = half 2)
VOLUME_SLOTS = {"map": "map.mrc", "map_half_A": "half1_map.mrc", "map_half_B": "half2_map.mrc"}

# a K-class run's folder of class k + 1 (1-based, 3 digits, as lifecycle/outputs.py writes them)
CLASS_FOLDER = re.compile(r"^class(\d{3})$")


# -- references and paths ------------------------------------------------------------------


def parse_output_ref(ref: str, default_output: str = "particles") -> tuple[str, str]:
    """``"J12.particles_selected"`` -> ``("J12", "particles_selected")``; ``"J12"`` -> ``("J12", default)``."""
    ref = ref.strip()
    job, _, out = ref.partition(".")
    job = job.strip().upper()
    out = out.strip() or default_output
    if not job.startswith("J") or not job[1:].isdigit():
        raise InputError(f"--particles {ref!r}: expected JOB.OUTPUT, e.g. J12.particles_selected")
    if not out.replace("_", "").isalnum() or not out[0].isalpha():
        raise InputError(f"--particles {ref!r}: output name {out!r} is not a cryoSPARC output name")
    return job, out


def stack_paths(ds: Dataset, field: str = "blob/path") -> list[str]:
    """The distinct (project-relative) stack paths of a particle Dataset, in first-seen order."""
    return list(dict.fromkeys(project_paths(ds[field])))


def localize_blob_paths(ds: Dataset, project_dir: str | os.PathLike, field: str = "blob/path") -> Dataset:
    """A copy of ``ds`` whose ``blob/path`` are absolute paths under ``project_dir``.

    cryoSPARC stores stack paths relative to the project folder (``J12/extract/x.mrc``,
    or ``>J12/extract/x.mrc`` in exported files); absolute paths are kept as they are.
    """
    root = Path(project_dir)
    rel = project_paths(ds[field])
    local = {p: p if os.path.isabs(p) else str(root / p) for p in dict.fromkeys(rel)}  # once per stack
    out = ds.copy()
    out[field] = np.array([local[p] for p in rel], dtype=object)
    return out


def check_input_dataset(ds: Dataset, source: str = "input") -> None:
    """InputError (one line) unless ``ds`` is a particle Dataset with uid, blob and ctf fields."""
    fields = set(ds.fields())
    if len(ds) == 0:
        raise InputError(f"{source}: no particles")
    missing = [f for f in ("uid", "blob/path", "blob/idx", "blob/psize_A", "ctf/df1_A") if f not in fields]
    if missing:
        raise InputError(f"{source}: {', '.join(missing)}: field missing (need particle blob and ctf slots)")


# -- particles output ----------------------------------------------------------------------


def particles_output(input_ds: Dataset, rotations: np.ndarray, shifts_A: np.ndarray,
                     halves: np.ndarray, psize_A: np.ndarray | float | None = None) -> Dataset:
    """The output particles: every field of ``input_ds`` plus new alignments3D poses.

    Rows stay in the order of ``input_ds`` (same uids). The four alignments3D
    fields are (re)written; any other field, including other ``alignments3D/*``
    fields of an earlier alignment, is passed through unchanged. ``psize_A``
    defaults to ``blob/psize_A``.
    """
    n = len(input_ds)
    if len(rotations) != n:
        raise InputError(f"{len(rotations)} poses for {n} input particles")
    if psize_A is None:
        psize_A = np.asarray(input_ds["blob/psize_A"], dtype=np.float64)
    return set_alignments(input_ds.copy(), alignments_fields(rotations, shifts_A, psize_A, halves))


def _rows_by_uid(want: np.ndarray, have: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, found): for each uid in ``want``, its row in ``have`` (any order) and whether it is there.

    Where not found the row is arbitrary (0 when ``have`` is empty).
    """
    want, have = np.asarray(want), np.asarray(have)
    if len(have) == 0:
        return np.zeros(len(want), dtype=np.int64), np.zeros(len(want), dtype=bool)
    order = np.argsort(have, kind="stable")
    pos = np.clip(np.searchsorted(have[order], want), 0, len(have) - 1)
    return order[pos], have[order][pos] == want


def particles_output_from_result(input_ds: Dataset, result_ds: Dataset) -> Dataset:
    """Copy the four alignments3D fields of ``result_ds`` (abinit's particles.cs) onto ``input_ds``, and its
    ``alignments3D/error`` (the run's per-particle loss, lifecycle/scores.py) and class fields
    (``CS_CLASS_FIELDS``, a K-class run) when it has them (the
    ``cryospin/confidence`` score has no slot in a cryoSPARC particle output; ``cryospin select`` reads
    it from abinit's own particles.cs).

    Rows are matched by ``uid`` when both have uids (the result may be in any
    order or a subset: particles missing from it are an error), else by position.
    """
    n = len(input_ds)
    rfields = set(result_ds.fields())
    missing = [f[0] for f in ALIGN_FIELDS if f[0] not in rfields]
    if missing:
        raise InputError(f"result particles: {', '.join(missing)}: field missing")
    if "uid" in rfields and "uid" in input_ds.fields() and len(result_ds):
        rows, found = _rows_by_uid(input_ds["uid"], result_ds["uid"])
        if not found.all():
            raise InputError(f"result particles: uid: {int((~found).sum())} of {n} input particles missing")
    else:
        if len(result_ds) != n:
            raise InputError(f"result particles: {len(result_ds)} rows for {n} input particles (no uid to match)")
        rows = np.arange(n)
    out = set_alignments(input_ds.copy(), {f: np.asarray(result_ds[f])[rows] for f, *_ in ALIGN_FIELDS})
    error = SCORE_COLUMNS["fit_loss"][1]  # the run's per-particle loss, where cryoSPARC keeps its own
    # with it the class fields of a K-class run (alignments3D/class 0-based, class_posterior, class_ess)
    for f, dtype in [(error, "f4"), *CS_CLASS_FIELDS]:
        if f in rfields:
            out.add_fields([(f, dtype)])
            out[f] = np.asarray(result_ds[f])[rows].astype(out[f].dtype)
    return out


def fill_allocated(allocated: Dataset, built: Dataset) -> Dataset:
    """Fill a server-allocated output (uid + the slot's expected fields) from ``built``.

    Rows are matched by uid. Fields of ``allocated`` that ``built`` lacks keep
    their allocation zeros, except neutral values for alignments3D bookkeeping
    (class posterior 1, weight 1, alpha 1, class 0). Returns ``allocated``.
    """
    rows, found = _rows_by_uid(allocated["uid"], built["uid"])
    if len(built) == 0 or not found.all():
        raise InputError("output particles: uids of the allocated output and of the result differ")
    bfields = set(built.fields())
    for f in allocated.fields():
        if f == "uid":
            continue
        if f in bfields:
            allocated[f] = np.asarray(built[f])[rows].astype(allocated[f].dtype)
        elif f in ALIGN_DEFAULTS:
            allocated[f] = np.full(len(allocated), ALIGN_DEFAULTS[f]).astype(allocated[f].dtype)
    return allocated


# -- volumes -------------------------------------------------------------------------------


def expected_voxel_size(psize_A: float, box: int, map_box: int) -> float:
    """Voxel size of a map reconstructed at ``map_box`` from particles of ``box`` px at ``psize_A``
    (Fourier cropping keeps the physical box: ``psize_A * box / map_box``)."""
    return float(psize_A) * int(box) / int(map_box)


def volume_info(path: str | os.PathLike, psize_A: float | None = None) -> tuple[tuple[int, int, int], float]:
    """(shape (z, y, x), voxel size in A) of an MRC map, from its header.

    With ``psize_A`` given, the header must agree with it (0.1%); a header with
    cell 0 (voxel size unset) is rewritten with ``psize_A``.
    """
    import mrcfile

    from cryospin_relion.io.mrc import read_mrc, stack_shape, write_mrc

    path = Path(path)
    shape = stack_shape(path)  # (nz, ny, nx), header only
    if min(shape) < 2:
        raise InputError(f"{path}: not a 3D map (shape {shape})")
    with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
        vs = float(m.voxel_size.x)
    if not np.isfinite(vs) or vs <= 0:
        if psize_A is None:
            raise InputError(f"{path}: voxel size unset in the MRC header (cella 0)")
        data, _ = read_mrc(path)
        write_mrc(path, data, psize_A)
        vs = float(psize_A)
    elif psize_A is not None and abs(vs - psize_A) > 1e-3 * psize_A:
        raise InputError(f"{path}: voxel size {vs:.4f} A in the header, expected {psize_A:.4f} A")
    return (int(shape[0]), int(shape[1]), int(shape[2])), vs


def volume_output(paths: dict[str, str], shapes: dict[str, Sequence[int]], psize_A: float,
                  uid: int | None = None) -> Dataset:
    """One-row volume Dataset: ``<slot>/path``, ``<slot>/shape`` (uint32 x3), ``<slot>/psize_A``.

    Args:
        paths: slot name (``map``, ``map_half_A``, ``map_half_B``) -> project-relative path.
        shapes: slot name -> (z, y, x).
        psize_A: voxel size in A.
        uid: row uid (random when None, as cryoSPARC allocates).
    """
    fields = []
    for slot in paths:
        fields += [(f"{slot}/path", "O"), (f"{slot}/shape", "u4", (3,)), (f"{slot}/psize_A", "f4")]
    ds = Dataset.allocate(1, fields)
    if uid is not None:
        ds["uid"] = np.array([uid], dtype=np.uint64)
    for slot, p in paths.items():
        ds[f"{slot}/path"] = np.array([str(PurePosixPath(p))], dtype=object)
        ds[f"{slot}/shape"] = np.asarray(shapes[slot], dtype=np.uint32).reshape(1, 3)
        ds[f"{slot}/psize_A"] = np.array([psize_A], dtype=np.float32)
    return ds


# -- abinit --------------------------------------------------------------------------------


@dataclass
class ClassOutputs:
    """The maps of one class of a K-class abinit run (folder ``classNNN``)."""

    number: int  # 1-based, as the folder and rlnClassNumber; cryoSPARC's alignments3D/class is number - 1
    volumes: dict[str, Path]  # volume slot -> MRC file
    fsc: Path | None


@dataclass
class AbinitOutputs:
    """Files written by ``cryospin abinit --o DIR`` that the cryoSPARC job uses."""

    outdir: Path
    volumes: dict[str, Path]  # volume slot -> MRC file; {} for a K-class run
    particles_cs: Path | None
    particles_star: Path | None
    fsc: Path | None
    # a K-class run (no top-level maps): the classes that have maps, by number (a class too small for two
    # halves has no folder); None for a one-class run
    classes: list[ClassOutputs] | None = None


def _maps(folder: Path) -> dict[str, Path]:
    vols = {}
    for slot, name in VOLUME_SLOTS.items():
        p = folder / name
        if not p.is_file():
            raise InputError(f"{p}: abinit output missing")
        vols[slot] = p
    return vols


def _file(p: Path) -> Path | None:
    return p if p.is_file() else None


def abinit_outputs(outdir: str | os.PathLike) -> AbinitOutputs:
    """Locate abinit's outputs; InputError naming the first missing map or particle file.

    A folder without a top-level map.mrc but with ``classNNN/`` folders is a K-class run: each
    such folder must hold the three maps.
    """
    outdir = Path(outdir)
    folders = sorted(d for d in outdir.iterdir() if d.is_dir() and CLASS_FOLDER.match(d.name)) \
        if outdir.is_dir() else []
    classes = None
    if folders and not (outdir / VOLUME_SLOTS["map"]).is_file():
        classes = [ClassOutputs(int(CLASS_FOLDER.match(d.name).group(1)), _maps(d), _file(d / "fsc.txt"))
                   for d in folders]
        vols = {}
    else:
        vols = _maps(outdir)
    cs = outdir / "particles.cs"
    star = outdir / "particles.star"
    if not cs.is_file() and not star.is_file():
        raise InputError(f"{outdir}: abinit wrote neither particles.cs nor particles.star")
    return AbinitOutputs(outdir, vols, _file(cs), _file(star), _file(outdir / "fsc.txt"), classes)


def result_particles(outputs: AbinitOutputs, input_ds: Dataset) -> Dataset:
    """The output particles Dataset (input fields + new alignments3D) from abinit's outputs.

    Uses particles.cs (matched by uid) when present, else particles.star (same
    row order as the input .cs given to abinit). For a K-class run the rows carry the class
    fields (``CS_CLASS_FIELDS``; from particles.star: ``rlnClassNumber`` - 1).
    """
    if outputs.particles_cs is not None:
        out = particles_output_from_result(input_ds, load_cs(outputs.particles_cs))
        if outputs.classes is not None and CS_CLASS_FIELDS[0][0] not in out.fields():
            raise InputError(f"{outputs.particles_cs}: {CS_CLASS_FIELDS[0][0]}: field missing (a K-class run)")
        return out
    from cryospin_relion.io.read import read_particles

    table = read_particles(outputs.particles_star, check_stacks=False, no_ctf=True)
    if not table.has_poses:
        raise InputError(f"{outputs.particles_star}: no poses")
    if len(table) != len(input_ds):
        raise InputError(f"{outputs.particles_star}: {len(table)} particles for {len(input_ds)} input particles")
    out = particles_output(input_ds, table.rotations, table.shifts_A, table.halves(), psize_A=table.apix)
    if outputs.classes is not None:
        parts = table.raw["particles"] if isinstance(table.raw, dict) else None
        if parts is None or STAR_CLASS not in parts.columns:
            raise InputError(f"{outputs.particles_star}: {STAR_CLASS}: column missing (a K-class run)")
        number = np.asarray(parts[STAR_CLASS], dtype=np.int64)
        if len(number) and number.min() < 1:
            raise InputError(f"{outputs.particles_star}: {STAR_CLASS}: {number.min()} (classes are 1-based)")
        values = {"alignments3D/class": number - 1, "alignments3D/class_posterior": 1.0, "alignments3D/class_ess": 1.0}
        out.add_fields(CS_CLASS_FIELDS)
        for f, _ in CS_CLASS_FIELDS:
            out[f] = np.broadcast_to(values[f], len(out)).astype(out[f].dtype)
    return out


def particle_classes(ds: Dataset) -> np.ndarray:
    """(N,) int64 0-based class of each row (``alignments3D/class``); InputError when absent."""
    f = CS_CLASS_FIELDS[0][0]
    if f not in ds.fields():
        raise InputError(f"output particles: {f}: field missing")
    return np.asarray(ds[f], dtype=np.int64)


def class_output_names(cls: int) -> tuple[str, str]:
    """(volume output, particles output) names of 0-based class ``cls``, as cryoSPARC's own ab-initio and
    heterogeneous refinement name theirs: ``volume_class_0``, ``particles_class_0`` for class001."""
    return f"volume_class_{int(cls)}", f"particles_class_{int(cls)}"


def abinit_command(particles_cs: str | os.PathLike, outdir: str | os.PathLike,
                   extra: Iterable[str] = (), gpus: int = 1) -> list[str]:
    """argv running ``cryospin abinit`` on ``particles_cs`` in a fresh Python (``cli.command_argv``); with
    ``gpus`` > 1 as that many data-parallel ranks under torchrun."""
    return [*command_argv("abinit", gpus), "--i", str(particles_cs), "--o", str(outdir), *[str(a) for a in extra]]


def run_command(cmd: Sequence[str], log: Callable[[str], None] = print, cwd: str | os.PathLike | None = None,
                log_every: float = 0.0) -> None:
    """Run ``cmd``, passing each output line (stdout and stderr merged) to ``log``.

    ``log_every`` > 0 forwards at most one line per that many seconds (plus the
    last 20 lines on failure), to keep a server event log short.
    Raises RuntimeError with the command's last line when it exits non-zero.
    """
    import collections
    import time

    tail: collections.deque[str] = collections.deque(maxlen=20)
    last = 0.0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=cwd, env=env, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            now = time.monotonic()
            if log_every <= 0 or now - last >= log_every:
                log(line)
                last = now
        rc = proc.wait()
    if rc != 0:
        if log_every > 0:
            for line in tail:
                log(line)
        msg = next((t for t in reversed(tail) if t.strip()), "")
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(map(str, cmd[1:4]))} ... exited with {rc}: {msg}")
