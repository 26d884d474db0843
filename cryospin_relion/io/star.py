"""RELION particle STAR files (3.0 single table; 3.1/4/5 optics + particles) <-> ParticleTable.

Reading (all vectorised with pandas, one check per unique stack):

- 3.1+: ``data_optics`` and ``data_particles`` in either order, joined on
  rlnOpticsGroup (particle-level columns win over optics-level ones). Pixel size
  from rlnImagePixelSize; box from rlnImageSize (must agree across groups).
- 3.0: one loop block holding rlnImageName (any block name). Pixel size from
  rlnImagePixelSize, else rlnDetectorPixelSize [um] * 1e4 / rlnMagnification
  (default 10000, as in RELION 3.0), else the ``angpix`` argument. Box from the
  stack header (0 = unknown when no stack can be found and check_stacks=False).
- Poses need rlnAngleRot and rlnAngleTilt (rlnAnglePsi defaults to 0); origins
  from rlnOriginX/YAngst [A], else rlnOriginX/Y [px] * pixel size (3.0 files, and
  RELION 3.1.3's own relion_project output, which has optics but pixel origins).
- ``no_ctf=True`` ignores any CTF columns (ctf=None); otherwise rlnDefocusU and
  rlnVoltage are required; like RELION, missing rlnSphericalAberration and
  rlnAmplitudeContrast default to 0 (with a warning), rlnDefocusV to rlnDefocusU,
  rlnDefocusAngle/rlnPhaseShift/rlnCtfBfactor to 0, rlnCtfScalefactor to 1.
  rlnCtfDataAreCtfPremultiplied (optics group in 3.1+, particle column in 3.0;
  default 0) becomes ``ctf.premultiplied`` per particle.

Writing produces a RELION 3.1 file (``# version 30001``) that RELION 3.1-5 read.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import starfile

from cryospin_relion.errors import InputError, InputErrors
from cryospin_relion.geometry.rotations import euler_to_matrix_np, matrix_to_euler_np
from cryospin_relion.io.atomic import atomic_path
from cryospin_relion.io.paths import first_header_box, locate_stacks
from cryospin_relion.io.particles import SCORE_COLUMNS, STAR_CLASS, CTFParams, ParticleTable

__all__ = ["read_star", "write_star", "load_star_blocks", "particle_block_name", "write_star_blocks"]

OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                 "rlnImageSize", "rlnImageDimensionality")
# images already multiplied by their CTF: an optics-group column in 3.1+, may be a particle column in 3.0
PREMULTIPLIED = "rlnCtfDataAreCtfPremultiplied"
# pre-3.1 optics-like particle columns that a 3.1 file must not carry per particle
_OLD_OPTICS = ("rlnMagnification", "rlnDetectorPixelSize") + OPTICS_LABELS


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def load_star_blocks(path: str | os.PathLike) -> dict:
    """All data blocks of a STAR file ({name: DataFrame or dict}); InputError if unparsable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises many types on garbage; all mean "not a STAR file"
        raise InputError(f"{path}: unreadable STAR file ({_one_line(e)})") from None
    if not isinstance(blocks, dict):
        raise InputError(f"{path}: unreadable STAR file (no data blocks)")
    return blocks


def _particle_block(blocks: dict, path: Path) -> tuple[str, pd.DataFrame, pd.DataFrame | None]:
    """(block name, particles, optics or None)."""
    frames = {}
    for k, v in blocks.items():
        if isinstance(v, pd.DataFrame):
            frames[k] = v
        elif isinstance(v, dict) and "rlnImageName" in v:  # one particle written without loop_
            frames[k] = pd.DataFrame({c: [x] for c, x in v.items()})
    names = [k for k, v in frames.items() if k != "optics" and "rlnImageName" in v.columns]
    if not names:
        listed = ", ".join(f"data_{k}" for k in blocks) or "none"
        raise InputError(f"{path}: rlnImageName: no particle table with image names (blocks: {listed})")
    key = "particles" if "particles" in names else names[0]
    optics = frames.get("optics")
    return key, frames[key], optics


def particle_block_name(blocks: dict, path: str | os.PathLike) -> str:
    """The name of the particle table among ``blocks`` (``load_star_blocks``), as ``read_star`` picks it;
    InputError when there is none."""
    return _particle_block(blocks, Path(path))[0]


def _repeated_labels(path: Path, key: str, parts: pd.DataFrame, optics: pd.DataFrame | None) -> list[str]:
    """One line per column listed twice in a block, and per optics group listed twice with
    different values (RELION would silently take one of them); [] when there is none."""
    problems = []
    for name, df in ((key, parts), ("optics", optics)):
        if df is None:
            continue
        counts = pd.Series(list(df.columns)).value_counts(sort=False)
        for label, k in counts[counts > 1].items():
            times = "twice" if k == 2 else f"{k} times"
            problems.append(f"{path}: data_{name}: {label}: column listed {times} (keep one)")
    if optics is not None and "rlnOpticsGroup" in optics.columns:
        labels = list(optics.columns)
        cells = optics.astype(str).set_axis(range(len(labels)), axis=1)  # by position: labels may repeat
        groups = cells[labels.index("rlnOpticsGroup")].str.strip()
        for g in pd.unique(groups[groups.duplicated()]):
            rows = cells[(groups == g).to_numpy()]
            differ = [k for k in rows.columns if rows[k].nunique() > 1]
            if differ:
                what = ", ".join(f"{labels[k]}: {' vs '.join(pd.unique(rows[k]))}" for k in differ[:3])
                times = "twice" if len(rows) == 2 else f"{len(rows)} times"
                problems.append(f"{path}: data_optics: rlnOpticsGroup: group {g} listed {times} with "
                                f"different values ({what}); keep one row per group")
    return problems


def _show(v) -> str:
    """A cell value for a message: strings quoted, numbers as numbers (no numpy reprs)."""
    return f"'{v}'" if isinstance(v, str) else str(v)


def _num(df: pd.DataFrame, col: str, path: Path, dtype=np.float64) -> np.ndarray:
    """Column as numbers; InputError naming the first bad row."""
    v = pd.to_numeric(df[col], errors="coerce")
    bad = ~np.isfinite(v.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: row {r + 1}: {col}: not a number ({_show(df[col].iloc[r])})")
    return v.to_numpy(dtype=dtype)


def _optional_num(df: pd.DataFrame, col: str) -> np.ndarray | None:
    """An optional column as float64 numbers; None when absent or not all numbers (nothing needs it)."""
    if col not in df.columns:
        return None
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return v if np.isfinite(v).all() else None


def _shared_strings(names: pd.Series) -> np.ndarray:
    """(N,) object array of str in which equal names are one Python object (8 bytes per row, not ~80)."""
    codes, uniq = pd.factorize(names.astype(str))
    return np.asarray(uniq, dtype=object)[codes]


def read_star(
    path: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
    angpix: float | None = None,
    no_ctf: bool = False,
    check_stacks: bool = True,
) -> ParticleTable:
    """Read a RELION particle STAR file into a ParticleTable (see module docstring).

    Args:
        datadir: extra folder to look for stacks in.
        angpix: pixel size [A] used only when the file has none.
        no_ctf: ignore CTF columns (ctf=None) instead of requiring them.
        check_stacks: require every stack to exist with enough images (else the
            missing ones are listed in ``table.extra["missing_stacks"]``).
    """
    path = Path(path)
    blocks = load_star_blocks(path)
    general = blocks.get("general")
    if isinstance(general, dict) and int(general.get("rlnTomoSubTomosAre2DStacks", 0) or 0) == 1:
        raise InputError(f"{path}: rlnTomoSubTomosAre2DStacks: tomography particles (2D tilt stacks) "
                         "are not single-particle images")
    key, parts, optics = _particle_block(blocks, path)
    twice = _repeated_labels(path, key, parts, optics)
    if twice:
        raise InputErrors(twice)
    parts = parts.reset_index(drop=True)
    n = len(parts)
    if n == 0:
        raise InputError(f"{path}: rlnImageName: no particles (empty table)")

    # -- join optics groups onto particles ---------------------------------------------
    if optics is not None and len(optics) and "rlnOpticsGroup" in optics.columns:
        fmt = "star31"
        opt = optics.drop_duplicates("rlnOpticsGroup").copy()
        opt["rlnOpticsGroup"] = _num(opt, "rlnOpticsGroup", path, np.int64)
        opt = opt.set_index("rlnOpticsGroup")
        if "rlnOpticsGroup" in parts.columns:
            og = _num(parts, "rlnOpticsGroup", path, np.int64)
        elif len(opt) == 1:
            og = np.full(n, int(opt.index[0]), dtype=np.int64)
        else:
            raise InputError(f"{path}: rlnOpticsGroup: missing in particles but {len(opt)} optics groups exist")
        unknown = ~np.isin(og, opt.index.to_numpy())
        if unknown.any():
            r = int(np.flatnonzero(unknown)[0])
            raise InputError(f"{path}: row {r + 1}: rlnOpticsGroup: group {og[r]} not in data_optics")
        joined = parts.copy()
        for c in opt.columns:
            if c not in joined.columns:
                joined[c] = opt[c].reindex(og).to_numpy()
        used = opt.loc[np.unique(og)]
    else:
        fmt, og, joined, used = "star30", np.ones(n, dtype=np.int64), parts, None

    if "rlnImageDimensionality" in joined.columns and (_num(joined, "rlnImageDimensionality", path) != 2).any():
        raise InputError(f"{path}: rlnImageDimensionality: 3D sub-tomograms are not supported (need 2D images)")

    # -- pixel size and box -------------------------------------------------------------
    if "rlnImagePixelSize" in joined.columns:
        apix = _num(joined, "rlnImagePixelSize", path)
    elif "rlnDetectorPixelSize" in joined.columns:  # um; RELION 3.0's default magnification is 10000
        mag = _num(joined, "rlnMagnification", path) if "rlnMagnification" in joined.columns else 1e4
        apix = _num(joined, "rlnDetectorPixelSize", path) * 1e4 / mag
    elif angpix:
        apix = np.full(n, float(angpix))
    else:
        raise InputError(f"{path}: rlnImagePixelSize: pixel size missing everywhere (no rlnImagePixelSize, "
                         "no rlnDetectorPixelSize/rlnMagnification; pass --angpix)")
    if (apix <= 0).any():
        r = int(np.flatnonzero(apix <= 0)[0])
        raise InputError(f"{path}: row {r + 1}: rlnImagePixelSize: pixel size {apix[r]} <= 0")

    box = 0
    if "rlnImageSize" in joined.columns:
        if used is not None and "rlnImageSize" in used.columns:
            sizes = pd.to_numeric(used["rlnImageSize"], errors="coerce")
            if sizes.nunique(dropna=False) > 1:
                per = ", ".join(f"group {g}: {s}" for g, s in sizes.items())
                raise InputError(f"{path}: rlnImageSize: optics groups have different box sizes ({per})")
        box = int(_num(joined, "rlnImageSize", path, np.int64)[0])

    # -- images -------------------------------------------------------------------------
    names = parts["rlnImageName"].astype(str).str.strip()
    parts3 = names.str.partition("@")
    head, at, tail = parts3[0], parts3[1], parts3[2]
    has_at = at == "@"
    stack_names = tail.where(has_at, head)
    idx = pd.to_numeric(head.where(has_at, "1"), errors="coerce")
    bad = idx.isna() | (idx < 1) | (stack_names == "")
    if bad.any():
        r = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{path}: row {r + 1}: rlnImageName: cannot parse '{names.iloc[r]}' (expected N@stack)")
    indices = idx.to_numpy(dtype=np.int64) - 1
    loc = locate_stacks(stack_names, indices, str(path), "rlnImageName", datadir, check_stacks, box or None)
    if not box:
        box = first_header_box(loc)

    # -- CTF ----------------------------------------------------------------------------
    ctf = None
    if not no_ctf:
        if "rlnDefocusU" not in joined.columns:
            raise InputError(f"{path}: rlnDefocusU: no CTF columns (pass --no-ctf to run without CTF)")
        if "rlnVoltage" not in joined.columns:
            raise InputError(f"{path}: rlnVoltage: CTF column missing (pass --no-ctf to run without CTF)")
        for c in ("rlnSphericalAberration", "rlnAmplitudeContrast"):
            if c not in joined.columns:  # RELION's CTF::read defaults these to 0 too
                warnings.warn(f"{path}: {c} missing: using RELION's default 0", RuntimeWarning, stacklevel=2)

        def col(c: str, default: float | str) -> np.ndarray:
            if c in joined.columns:
                return _num(joined, c, path)
            return _num(joined, default, path) if isinstance(default, str) else np.full(n, float(default))

        ctf = CTFParams(
            defocus_u=col("rlnDefocusU", 0.0), defocus_v=col("rlnDefocusV", "rlnDefocusU"),
            defocus_angle=col("rlnDefocusAngle", 0.0), voltage=col("rlnVoltage", 0.0),
            cs=col("rlnSphericalAberration", 0.0), amp_contrast=col("rlnAmplitudeContrast", 0.0),
            phase_shift=col("rlnPhaseShift", 0.0), bfactor=col("rlnCtfBfactor", 0.0),
            scale=col("rlnCtfScalefactor", 1.0),
            premultiplied=(_num(joined, PREMULTIPLIED, path) != 0 if PREMULTIPLIED in joined.columns
                           else np.zeros(n, dtype=bool)),
        )

    # -- poses --------------------------------------------------------------------------
    rotations = shifts = None
    if {"rlnAngleRot", "rlnAngleTilt"} <= set(joined.columns):
        psi = _num(joined, "rlnAnglePsi", path) if "rlnAnglePsi" in joined.columns else np.zeros(n)
        ang = np.stack([_num(joined, "rlnAngleRot", path), _num(joined, "rlnAngleTilt", path), psi], -1)
        rotations = euler_to_matrix_np(ang)
        shifts = np.zeros((n, 2))
        for k, ax in enumerate("XY"):
            if f"rlnOrigin{ax}Angst" in joined.columns:
                shifts[:, k] = _num(joined, f"rlnOrigin{ax}Angst", path)
            elif f"rlnOrigin{ax}" in joined.columns:  # pixels
                shifts[:, k] = _num(joined, f"rlnOrigin{ax}", path) * apix
    subset = _num(joined, "rlnRandomSubset", path, np.int64) if "rlnRandomSubset" in joined.columns else None
    scores = {attr: v for attr, (label, _) in SCORE_COLUMNS.items()  # a run's scores (written below)
              if (v := _optional_num(joined, label)) is not None}

    return ParticleTable(
        source_file=str(path), source_format=fmt, stack_paths=loc.stack_paths, stack_indices=indices,
        box=int(box), apix=apix.astype(np.float64), ctf=ctf, rotations=rotations, shifts_A=shifts,
        subset=subset, optics_group=og.astype(np.int64), sign=1.0,
        raw={"optics": None if optics is None else optics.reset_index(drop=True), "particles": parts},
        extra={"missing_stacks": loc.missing, "stack_names": _shared_strings(stack_names)}, **scores,
    )


# -- writing ----------------------------------------------------------------------------------


_ROWS_PER_CHUNK = 100_000  # rows formatted at once: bounds the writer's memory for millions of particles


def _round_significant(x: np.ndarray, digits: int = 10) -> np.ndarray:
    """(N,) float64 rounded to ``digits`` significant digits (as ``%.{digits}g`` prints them), vectorised.

    Why: the writer prints floats in their shortest round-trip form (C++, fast), so the nearest double
    to a ``digits``-digit decimal prints as that decimal; k / 10^d is correctly rounded for exact k and
    10^d (d <= 22). Values read from a file with <= ``digits`` digits are unchanged."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    ok = np.isfinite(x) & (x != 0)
    if not ok.any():
        return out
    a = x[ok]
    d = digits - 1 - np.floor(np.log10(np.abs(a))).astype(np.int64)
    r = a.copy()
    up = (d >= 0) & (d <= 22)
    r[up] = np.round(a[up] * 10.0 ** d[up]) / 10.0 ** d[up]
    down = (d < 0) & (d >= -22)
    r[down] = np.round(a[down] / 10.0 ** -d[down]) * 10.0 ** -d[down]
    out[ok] = r
    return out


def _star_strings(col: pd.Series) -> pa.Array:
    """One column as STAR tokens: floats to 10 significant digits, ints, and strings quoted when they
    hold whitespace or quotes (inner quotes doubled) or are empty (``""``), so no column can shift."""
    v = col.to_numpy() if col.dtype.kind in "biuf" else None
    if v is not None and v.dtype.kind == "f":
        return pc.cast(pa.array(_round_significant(v)), pa.string())
    if v is not None:
        return pc.cast(pa.array(v.astype(np.int64)), pa.string())
    s = pa.array(col.astype(str).to_numpy(dtype=object), type=pa.string())
    quote = pc.or_(pc.match_substring_regex(s, r'[\s"]'), pc.equal(pc.utf8_length(s), 0))
    if not pc.any(quote).as_py():
        return s
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(s, '"', '""'), '"', "")
    return pc.if_else(quote, quoted, s)


def _write_block(f, name: str, df: pd.DataFrame) -> None:
    """One STAR loop block, RELION style (``# version 30001`` precedes it), to the binary file ``f``;
    formatted in C++ (pyarrow) by chunks of rows (a million rows in seconds, bounded memory)."""
    head = [f"\n# version 30001\n\ndata_{name}\n\nloop_"]
    head += [f"_{c} #{i + 1}" for i, c in enumerate(df.columns)]
    f.write(("\n".join(head) + "\n").encode())
    for a in range(0, len(df) if df.shape[1] else 0, _ROWS_PER_CHUNK):
        part = df.iloc[a: a + _ROWS_PER_CHUNK]
        cols = [_star_strings(part.iloc[:, k]) for k in range(part.shape[1])]
        rows = pc.binary_join_element_wise(*cols, " ") if len(cols) > 1 else cols[0]
        lines = pc.binary_join_element_wise(rows, "", "\n")  # each row + newline
        f.write(_concat(lines))
    f.write(b"\n")


def _concat(lines: pa.Array) -> bytes:
    """The bytes of all strings of a string array, back to back."""
    lines = lines.cast(pa.large_string())
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset: lines.offset + len(lines) + 1]
    return lines.buffers()[2].to_pybytes()[offsets[0]: offsets[-1]]


def _format_block(name: str, df: pd.DataFrame) -> str:
    """One STAR loop block as text (see ``_write_block``)."""
    buf = io.BytesIO()
    _write_block(buf, name, df)
    return buf.getvalue().decode()


def write_star_blocks(blocks: dict, path: str | os.PathLike) -> None:
    """Write STAR ``blocks`` ({name: DataFrame (a loop) or dict (label-value pairs)}, as
    ``load_star_blocks`` reads them) in their order, atomically (``cryospin select``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for name, block in blocks.items():
            if isinstance(block, pd.DataFrame):
                _write_block(f, name, block)
            else:
                pairs = "\n".join(f"_{k} {_pair_value(v)}" for k, v in dict(block).items())
                f.write(f"\n# version 30001\n\ndata_{name}\n\n{pairs}\n\n".encode())


def _pair_value(v) -> str:
    """A label-value pair's value as STAR text (quoted when empty or holding whitespace)."""
    s = f"{v:.10g}" if isinstance(v, float) else str(v)
    return f'"{s}"' if s == "" or any(c.isspace() for c in s) else s


def _image_names(table: ParticleTable) -> pd.Series:
    """rlnImageName: the original one for STAR input, else ``{idx+1:06d}@{stack as given}``."""
    raw = table.raw
    if isinstance(raw, dict) and raw.get("particles") is not None and "rlnImageName" in raw["particles"]:
        return raw["particles"]["rlnImageName"].astype(str).reset_index(drop=True)
    names = table.extra.get("stack_names")
    if names is None:
        names = table.stack_paths
    num = pd.Series(np.asarray(table.stack_indices) + 1).astype(str).str.zfill(6)
    return num + "@" + pd.Series(np.asarray(names, dtype=object)).astype(str)


def _optics_groups(table: ParticleTable) -> tuple[np.ndarray, pd.DataFrame]:
    """(N,) output optics group and the data_optics table.

    Groups are the input groups, split further wherever pixel size or the
    optics-level CTF values (voltage, Cs, amplitude contrast) differ inside one.
    """
    n = len(table)
    key = pd.DataFrame({"og": np.asarray(table.optics_group), "apix": np.round(table.apix, 6)})
    if table.ctf is not None:
        key["volt"] = np.round(table.ctf.voltage, 6)
        key["cs"] = np.round(table.ctf.cs, 6)
        key["amp"] = np.round(table.ctf.amp_contrast, 6)
    pre = _premultiplied(table)
    if pre is not None:
        key["pre"] = pre.astype(np.int64)
    first = key.drop_duplicates().reset_index()  # 'index' = first row of each combination
    renumber = first["og"].duplicated(keep=False).any()
    if renumber:
        first = first.assign(g=np.arange(1, len(first) + 1))
        group = key.merge(first.drop(columns="index"), on=list(key.columns), how="left")["g"].to_numpy()
    else:
        group = key["og"].to_numpy()
        first = first.assign(g=first["og"])
    raw_opt = table.raw.get("optics") if isinstance(table.raw, dict) else None
    raw_parts = table.raw.get("particles") if isinstance(table.raw, dict) else None
    if raw_parts is not None and len(raw_parts) != n:
        raw_parts = None
    rows = []
    for _, f in first.iterrows():
        base = {}
        if raw_opt is not None and "rlnOpticsGroup" in raw_opt.columns:
            m = raw_opt[pd.to_numeric(raw_opt["rlnOpticsGroup"], errors="coerce") == f["og"]]
            if len(m):
                base = m.iloc[0].to_dict()
        r = int(f["index"])
        row = {
            "rlnOpticsGroup": int(f["g"]),
            "rlnOpticsGroupName": (str(base["rlnOpticsGroupName"]) if "rlnOpticsGroupName" in base and not renumber
                                   else f"opticsGroup{int(f['g'])}"),
        }
        if table.ctf is not None:
            row.update(rlnVoltage=float(table.ctf.voltage[r]), rlnSphericalAberration=float(table.ctf.cs[r]),
                       rlnAmplitudeContrast=float(table.ctf.amp_contrast[r]))
        if pre is not None:
            row[PREMULTIPLIED] = int(pre[r])
        elif raw_parts is not None:  # CTF ignored: still move 3.0 per-particle optics values to data_optics
            for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
                if c in raw_parts.columns:
                    row[c] = raw_parts[c].iloc[r]
        row["rlnImagePixelSize"] = float(table.apix[r])
        if table.box:
            row["rlnImageSize"] = int(table.box)
        row["rlnImageDimensionality"] = 2
        for c, v in base.items():
            if c not in row and c not in ("rlnMagnification", "rlnDetectorPixelSize"):
                row[c] = v
        rows.append(row)
    rows.sort(key=lambda r: r["rlnOpticsGroup"])
    return np.asarray(group, dtype=np.int64), pd.DataFrame(rows)


def _premultiplied(table: ParticleTable) -> np.ndarray | None:
    """(N,) bool rlnCtfDataAreCtfPremultiplied to write in data_optics, or None when no image is premultiplied
    (then an input optics column passes through as it was)."""
    pre = None if table.ctf is None else table.ctf.premultiplied
    return None if pre is None or not np.asarray(pre).any() else np.asarray(pre, dtype=bool)


def write_star(table: ParticleTable, path: str | os.PathLike) -> None:
    """Write a RELION 3.1+ particle STAR file (data_optics + data_particles), atomically.

    Every original particle column is kept (old pixel rlnOriginX/Y and pre-3.1
    optics columns such as rlnMagnification are replaced by their 3.1 forms);
    poses become rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst, halves rlnRandomSubset
    (a seeded balanced split when the table has none), classes rlnClassNumber (1-based). rlnCtfDataAreCtfPremultiplied
    goes to data_optics (groups split where it differs), also from a 3.0 particle column.
    """
    n = len(table)
    raw = table.raw
    if isinstance(raw, dict) and raw.get("particles") is not None and len(raw["particles"]) == n:
        parts = raw["particles"].reset_index(drop=True).copy()
        parts = parts.drop(columns=[c for c in _OLD_OPTICS if c in parts.columns])
        if table.ctf is not None and PREMULTIPLIED in parts.columns:  # a 3.0 particle column: to data_optics
            parts = parts.drop(columns=[PREMULTIPLIED])
    else:
        parts = pd.DataFrame(index=pd.RangeIndex(n))
        mics = table.extra.get("micrograph_names")
        if mics is not None:
            parts["rlnMicrographName"] = np.asarray(mics, dtype=object)
    parts["rlnImageName"] = _image_names(table).to_numpy()
    group, optics = _optics_groups(table)
    parts["rlnOpticsGroup"] = group
    if table.ctf is not None:
        c = table.ctf
        for label, v in (("rlnDefocusU", c.defocus_u), ("rlnDefocusV", c.defocus_v),
                         ("rlnDefocusAngle", c.defocus_angle), ("rlnPhaseShift", c.phase_shift),
                         ("rlnCtfBfactor", c.bfactor), ("rlnCtfScalefactor", c.scale)):
            parts[label] = np.asarray(v, dtype=np.float64)
    if table.rotations is not None:
        ang = matrix_to_euler_np(table.rotations)
        parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"] = ang[:, 0], ang[:, 1], ang[:, 2]
        parts = parts.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in parts.columns])
        parts["rlnOriginXAngst"] = table.shifts_A[:, 0]
        parts["rlnOriginYAngst"] = table.shifts_A[:, 1]
    parts["rlnRandomSubset"] = table.halves()
    for attr, (label, _) in SCORE_COLUMNS.items():  # a run's scores replace any earlier column of that name
        if getattr(table, attr) is not None:
            parts[label] = np.asarray(getattr(table, attr), dtype=np.float64)
    if table.classes is not None:  # a K-class run: replaces any earlier class column (1-based, as RELION counts)
        parts[STAR_CLASS] = np.asarray(table.classes, dtype=np.int64) + 1
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_block(f, "optics", optics)
        _write_block(f, "particles", parts)
