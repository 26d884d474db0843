"""cryoSPARC particle .cs files <-> ParticleTable (via cryosparc-tools ``Dataset``).

Field conventions (units converted to RELION's at this edge):

- ``blob/path`` (a leading '>' means project-relative; stripped: ``project_paths``), ``blob/idx``
  0-based, ``blob/shape`` (ny, nx), ``blob/psize_A`` [A], ``blob/sign`` -> table.sign.
- ``alignments3D/pose`` rotation vector [rad] -> A = cryosparc_pose_to_relion(pose);
  ``alignments3D/shift`` [px of ``alignments3D/psize_A``] -> RELION origin in A,
  same sign; ``alignments3D/split`` 0/1 -> rlnRandomSubset 1/2. Ab-initio outputs
  with only ``alignments_class_0/`` are read the same way. Writing is the inverse
  (``alignments_fields``), with the dtypes of ``ALIGN_FIELDS``; a K-class run's classes go to
  ``CS_CLASS_FIELDS`` (io/particles.py: alignments3D/class 0-based, class_posterior, class_ess).
- CTF: df1_A/df2_A -> defocus U/V [A], df_angle_rad and phase_shift_rad -> degrees,
  accel_kv, cs_mm, amp_contrast, bfactor (0 if absent), scale (1 if absent).

A .cs has no optics groups: every particle is in group 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset

from cryospin_relion.errors import InputError
from cryospin_relion.geometry.rotations import cryosparc_pose_to_relion, relion_to_cryosparc_pose
from cryospin_relion.io.atomic import atomic_path
from cryospin_relion.io.paths import first_header_box, locate_stacks
from cryospin_relion.io.particles import CS_CLASS_FIELDS, SCORE_COLUMNS, CTFParams, ParticleTable

__all__ = ["read_cs", "write_cs", "load_cs", "save_cs", "project_paths", "ALIGN_FIELDS", "alignments_fields",
           "set_alignments"]

# the alignments3D fields we write, with the dtypes of cryoSPARC's own particle files
ALIGN_FIELDS = [
    ("alignments3D/split", "u4"),
    ("alignments3D/shift", "f4", (2,)),
    ("alignments3D/pose", "f4", (3,)),
    ("alignments3D/psize_A", "f4"),
]


def load_cs(path: str | os.PathLike) -> Dataset:
    """The Dataset of a .cs file; InputError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return Dataset.load(path)
    except Exception as e:  # numpy / cryosparc-tools raise several types on bad files
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise InputError(f"{path}: unreadable .cs file ({msg})") from None


def save_cs(ds: Dataset, path: str | os.PathLike) -> Path:
    """Save a Dataset as a .cs (numpy structured array, loadable by ``numpy.load``), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            ds.save(fh)
    return path


def project_paths(values: np.ndarray) -> np.ndarray:
    """A path field (``blob/path``, ``location/micrograph_path``) as an object array of str.

    Exported .cs files mark project-relative paths with a leading '>': it is removed
    (a job's own .cs has the same project-relative paths unmarked).
    """
    a = np.asarray(values)
    if a.dtype.kind == "S":
        a = np.char.decode(a, "utf-8")
    return pd.Series(a, dtype=object).astype(str).str.replace(r"^>", "", regex=True).to_numpy(dtype=object)


def alignments_fields(rotations: np.ndarray, shifts_A: np.ndarray, psize_A: np.ndarray | float,
                      halves: np.ndarray) -> dict[str, np.ndarray]:
    """The ALIGN_FIELDS arrays (cryoSPARC dtypes) from RELION poses: the inverse of ``read_cs``'s poses.

    Args:
        rotations: (N, 3, 3) RELION A matrices -> ``alignments3D/pose``, rotation vector of A^T.
        shifts_A: (N, 2) RELION origins (rlnOriginX/YAngst) in A -> ``alignments3D/shift``
            in pixels of ``psize_A``, same sign.
        psize_A: pixel size of the particle images (scalar or (N,)) -> ``alignments3D/psize_A``.
        halves: (N,) rlnRandomSubset in {1, 2} -> ``alignments3D/split`` 0/1.
    """
    rotations = np.asarray(rotations, dtype=np.float64)
    n = len(rotations)
    shifts_A = np.asarray(shifts_A, dtype=np.float64).reshape(n, 2)
    psize = np.broadcast_to(np.asarray(psize_A, dtype=np.float64), (n,))
    if (psize <= 0).any() or not np.isfinite(psize).all():
        raise InputError("alignments3D/psize_A: pixel size must be a positive number")
    halves = np.asarray(halves, dtype=np.int64).reshape(n)
    if not set(np.unique(halves).tolist()) <= {1, 2}:
        raise InputError(f"halves must be 1 or 2, got {sorted(set(np.unique(halves).tolist()))}")
    return {
        "alignments3D/pose": relion_to_cryosparc_pose(rotations).astype(np.float32).reshape(n, 3),
        "alignments3D/shift": (shifts_A / psize[:, None]).astype(np.float32),
        "alignments3D/psize_A": psize.astype(np.float32),
        "alignments3D/split": (halves - 1).astype(np.uint32),
    }


def set_alignments(ds: Dataset, fields: Mapping[str, np.ndarray]) -> Dataset:
    """Write the ALIGN_FIELDS ``fields`` into ``ds`` in place (adding the ones it lacks); returns ``ds``.

    Values are cast to the field's dtype in ``ds``; other fields, including other
    ``alignments3D/*`` fields of an earlier alignment, are left as they are.
    """
    ds.add_fields(ALIGN_FIELDS)  # skips fields ds already has
    for f, *_ in ALIGN_FIELDS:
        ds[f] = np.asarray(fields[f]).astype(ds[f].dtype)
    return ds


def _finite(ds: Dataset, f: str, path: Path) -> np.ndarray:
    v = np.asarray(ds[f], dtype=np.float64)
    bad = ~np.isfinite(v.reshape(len(v), -1)).all(-1)
    if bad.any():
        raise InputError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 1}: {f}: not a finite number")
    return v


def read_cs(
    path: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
    angpix: float | None = None,
    no_ctf: bool = False,
    check_stacks: bool = True,
) -> ParticleTable:
    """Read a cryoSPARC particle .cs into a ParticleTable (arguments as ``read_star``)."""
    path = Path(path)
    ds = load_cs(path)
    n = len(ds)
    fields = set(ds.fields())
    if n == 0:
        raise InputError(f"{path}: uid: no particles (the .cs has 0 rows)")
    for f in ("blob/path", "blob/idx"):
        if f not in fields:
            raise InputError(f"{path}: {f}: field missing (not a particle .cs with images)")
    stack_names = pd.Series(project_paths(ds["blob/path"]), dtype=object)
    indices = np.asarray(ds["blob/idx"], dtype=np.int64)

    box = 0
    if "blob/shape" in fields:
        shape = np.asarray(ds["blob/shape"], dtype=np.int64).reshape(n, -1)
        if (shape[:, 0] != shape[:, -1]).any():
            r = int(np.flatnonzero(shape[:, 0] != shape[:, -1])[0])
            raise InputError(f"{path}: row {r + 1}: blob/shape: non-square images {shape[r].tolist()}")
        if (shape[:, 0] != shape[0, 0]).any():
            raise InputError(f"{path}: blob/shape: images of different sizes {np.unique(shape[:, 0]).tolist()}")
        box = int(shape[0, 0])
    loc = locate_stacks(stack_names, indices, str(path), "blob/path", datadir, check_stacks, box or None)
    if not box:
        box = first_header_box(loc)

    if "blob/psize_A" in fields:
        apix = _finite(ds, "blob/psize_A", path)
    elif angpix:
        apix = np.full(n, float(angpix))
    else:
        raise InputError(f"{path}: blob/psize_A: pixel size missing everywhere (pass --angpix)")
    if (apix <= 0).any():
        raise InputError(f"{path}: row {int(np.flatnonzero(apix <= 0)[0]) + 1}: blob/psize_A: pixel size <= 0")

    sign = 1.0
    if "blob/sign" in fields:
        signs = np.unique(np.asarray(ds["blob/sign"], dtype=np.float64))
        if len(signs) > 1:
            raise InputError(f"{path}: blob/sign: mixed image signs {signs.tolist()} in one file")
        sign = float(signs[0]) or 1.0

    ctf = None
    if not no_ctf:
        for f in ("ctf/df1_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"):
            if f not in fields:
                raise InputError(f"{path}: {f}: no CTF fields (pass --no-ctf to run without CTF)")

        def get(f: str, default: float | str) -> np.ndarray:
            if f in fields:
                return _finite(ds, f, path)
            return _finite(ds, default, path) if isinstance(default, str) else np.full(n, float(default))

        ctf = CTFParams(
            defocus_u=get("ctf/df1_A", 0.0), defocus_v=get("ctf/df2_A", "ctf/df1_A"),
            defocus_angle=np.rad2deg(get("ctf/df_angle_rad", 0.0)), voltage=get("ctf/accel_kv", 0.0),
            cs=get("ctf/cs_mm", 0.0), amp_contrast=get("ctf/amp_contrast", 0.0),
            phase_shift=np.rad2deg(get("ctf/phase_shift_rad", 0.0)), bfactor=get("ctf/bfactor", 0.0),
            scale=get("ctf/scale", 1.0),
        )

    rotations = shifts = subset = None
    prefix = next((p for p in ("alignments3D/", "alignments_class_0/") if f"{p}pose" in fields), None)
    if prefix is not None:
        rotations = cryosparc_pose_to_relion(_finite(ds, f"{prefix}pose", path))
        shifts = np.zeros((n, 2))
        if f"{prefix}shift" in fields:
            ps = _finite(ds, f"{prefix}psize_A", path) if f"{prefix}psize_A" in fields else apix
            ps = np.where(ps > 0, ps, apix)  # an unset (0) alignment pixel size means the blob's
            shifts = _finite(ds, f"{prefix}shift", path) * ps[:, None]
        if f"{prefix}split" in fields:
            subset = np.asarray(ds[f"{prefix}split"], dtype=np.int64) + 1

    extra: dict = {"missing_stacks": loc.missing, "stack_names": stack_names.to_numpy(dtype=object)}
    if "location/micrograph_path" in fields:
        extra["micrograph_names"] = project_paths(ds["location/micrograph_path"])
    return ParticleTable(
        source_file=str(path), source_format="cs", stack_paths=loc.stack_paths, stack_indices=indices,
        box=int(box), apix=apix, ctf=ctf, rotations=rotations, shifts_A=shifts, subset=subset,
        optics_group=np.ones(n, dtype=np.int64), sign=sign, raw=ds, extra=extra,
    )


def _new_dataset(table: ParticleTable) -> Dataset:
    """blob/*, ctf/* (and location/micrograph_path) fields for a table not read from a .cs."""
    n = len(table)
    names = table.extra.get("stack_names")
    names = np.asarray(table.stack_paths if names is None else names, dtype=object)
    fields = [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)), ("blob/psize_A", "f4"),
              ("blob/sign", "f4")]
    ctf_fields = [("ctf/type", "O"), ("ctf/exp_group_id", "u4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
                  ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"),
                  ("ctf/df_angle_rad", "f4"), ("ctf/phase_shift_rad", "f4"), ("ctf/scale", "f4"),
                  ("ctf/scale_const", "f4"), ("ctf/shift_A", "f4", (2,)), ("ctf/tilt_A", "f4", (2,)),
                  ("ctf/trefoil_A", "f4", (2,)), ("ctf/tetra_A", "f4", (4,)), ("ctf/anisomag", "f4", (4,)),
                  ("ctf/bfactor", "f4")]
    if table.ctf is not None:
        fields += ctf_fields
    mics = _micrographs(table)
    if mics is not None:
        fields.append(("location/micrograph_path", "O"))
    ds = Dataset.allocate(n, fields)
    ds["blob/path"] = names
    ds["blob/idx"] = np.asarray(table.stack_indices, dtype=np.uint32)
    ds["blob/shape"] = np.full((n, 2), table.box, dtype=np.uint32)
    ds["blob/psize_A"] = table.apix.astype(np.float32)
    ds["blob/sign"] = np.full(n, table.sign, dtype=np.float32)
    if table.ctf is not None:
        c = table.ctf
        ds["ctf/type"] = np.full(n, "imported", dtype=object)
        ds["ctf/exp_group_id"] = np.asarray(table.optics_group, dtype=np.uint32)
        ds["ctf/accel_kv"] = c.voltage.astype(np.float32)
        ds["ctf/cs_mm"] = c.cs.astype(np.float32)
        ds["ctf/amp_contrast"] = c.amp_contrast.astype(np.float32)
        ds["ctf/df1_A"] = c.defocus_u.astype(np.float32)
        ds["ctf/df2_A"] = c.defocus_v.astype(np.float32)
        ds["ctf/df_angle_rad"] = np.deg2rad(c.defocus_angle).astype(np.float32)
        ds["ctf/phase_shift_rad"] = np.deg2rad(c.phase_shift).astype(np.float32)
        ds["ctf/scale"] = c.scale.astype(np.float32)
        ds["ctf/bfactor"] = c.bfactor.astype(np.float32)
    if mics is not None:
        ds["location/micrograph_path"] = mics
    return ds


def _micrographs(table: ParticleTable) -> np.ndarray | None:
    mics = table.extra.get("micrograph_names")
    raw = table.raw
    if mics is None and isinstance(raw, dict) and raw.get("particles") is not None:
        p = raw["particles"]
        if "rlnMicrographName" in p.columns and len(p) == len(table):
            mics = p["rlnMicrographName"].astype(str).to_numpy(dtype=object)
    return None if mics is None else np.asarray(mics, dtype=object)


def write_cs(table: ParticleTable, path: str | os.PathLike) -> None:
    """Write a cryoSPARC .cs (numpy structured array, loadable by ``numpy.load``), atomically.

    For .cs input every original field passes through (rows as in the table);
    otherwise blob/* and ctf/* are built. Poses go to the ALIGN_FIELDS
    (``alignments_fields``; split balanced random when the table has no halves); classes (a K-class run)
    to CS_CLASS_FIELDS: alignments3D/class 0-based, class_posterior and class_ess 1.0.
    """
    n = len(table)
    ds = table.raw.copy() if isinstance(table.raw, Dataset) and len(table.raw) == n else _new_dataset(table)
    if table.rotations is not None:
        set_alignments(ds, alignments_fields(table.rotations, table.shifts_A, table.apix, table.halves()))
    for attr, (_, name) in SCORE_COLUMNS.items():  # float32, as cryoSPARC's own alignments3D/error
        if getattr(table, attr) is not None:
            ds.add_fields([(name, "f4")])
            ds[name] = np.asarray(getattr(table, attr), dtype=np.float32)
    if table.classes is not None:  # hard assignment: posterior 1 for the class, one effective class
        ds.add_fields(CS_CLASS_FIELDS)  # skips the fields an input (e.g. a heterogeneous refinement's) has
        values = {"alignments3D/class": table.classes, "alignments3D/class_posterior": np.ones(n),
                  "alignments3D/class_ess": np.ones(n)}
        for f, _ in CS_CLASS_FIELDS:
            ds[f] = np.asarray(values[f]).astype(ds[f].dtype)
    save_cs(ds, path)
