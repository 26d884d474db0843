"""Property-based tests: hostile STAR files, .cs arrays, MRC stacks and YAML configs.

For every generated input, ``info``, ``abinit --dry-run``, ``reconstruct`` and ``convert``
either succeed or exit 2 with ``cryospin CMD: error: ...`` lines on stderr: never a
traceback (exit 1), never a file left in ``--o`` after a refusal, never a change to an
input file. The examples are few and small, so the fuzzer adds about a minute to the suite.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cryospin_relion import cli  # noqa: E402

# CRYOSPIN_FUZZ_EXAMPLES=500 for a longer, randomised search (the suite's run is short and repeatable)
_N = int(os.environ.get("CRYOSPIN_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_N or 25, deadline=None, derandomize=not _N,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

BOX = 8
LABELS = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
          "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnOpticsGroup", "rlnAngleRot",
          "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnRandomSubset",
          "rlnMicrographName", "rlnCtfBfactor", "rlnPhaseShift", "rlnMagnification", "rlnDetectorPixelSize",
          "rlnCtfDataAreCtfPremultiplied", "rlnSomethingElse"]
VALUES = st.one_of(
    st.sampled_from(["1", "2", "0", "-1", "300", "2.7", "0.1", "1.5", "15000", "nan", "inf", "-inf", "1e309", "x",
                     '""', "None", "1@stack.mrcs", "2@stack.mrcs", "9@stack.mrcs", "1@missing.mrcs", "0@stack.mrcs",
                     "stack.mrcs", "1@/nonexistent/abs.mrcs"]),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda x: f"{x:g}"),
    st.integers(-3, 70000).map(str),
)


def _write_stack(folder: Path, n: int = 4) -> None:
    from cryospin_relion.io.mrc import write_stack

    rng = np.random.default_rng(0)
    write_stack(folder / "stack.mrcs", rng.normal(size=(n, BOX, BOX)).astype(np.float32), 2.0)


@st.composite
def star_texts(draw) -> str:
    """A STAR file: optional data_optics, a particles block (or a RELION 3.0 single table), random labels
    (duplicates included), random values, ragged rows."""
    blocks = []
    with_optics = draw(st.booleans())
    if with_optics:
        ol = draw(st.lists(st.sampled_from(["rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
                                            "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
                                            "rlnOpticsGroupName", "rlnCtfDataAreCtfPremultiplied"]),
                           min_size=1, max_size=8))
        rows = draw(st.lists(st.lists(VALUES, min_size=len(ol), max_size=len(ol)), min_size=0, max_size=3))
        blocks.append(_block("optics", ol, rows))
    labels = draw(st.lists(st.sampled_from(LABELS), min_size=0, max_size=12))
    ragged = draw(st.booleans())
    n = draw(st.integers(0, 5))
    rows = [draw(st.lists(VALUES, min_size=max(0, len(labels) - (1 if ragged and i == 0 else 0)),
                          max_size=len(labels))) for i in range(n)]
    blocks.append(_block("particles" if with_optics else "", labels, rows))
    if draw(st.booleans()):
        blocks.append(draw(st.sampled_from(["data_\n", "garbage\n", "data_x\nloop_\n_rlnA #1\n", "\x00\x01"])))
    return "\n".join(blocks)


def _block(name: str, labels: list[str], rows: list[list[str]]) -> str:
    lines = [f"data_{name}", "", "loop_"] + [f"_{lab} #{i + 1}" for i, lab in enumerate(labels)]
    lines += [" ".join(r) for r in rows]
    return "\n".join(lines) + "\n"


yaml_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=True, width=32),
                        st.text(max_size=5), st.lists(st.one_of(st.booleans(), st.floats(width=32)), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
yaml_keys = st.sampled_from(["heads", "box", "invert", "no_ctf", "max_shift", "pose_betas", "loss", "device", "seed",
                             "lr_pose", "explore_top", "c2f_epochs", "unknown_key", "checkpoint_minutes"])


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_commands(inputs: Path, particles: Path, extra_abinit: list[str] = ()) -> None:
    """Every command: exit 0 or 2 with error lines only; no file in --o after exit 2; inputs unchanged."""
    before = _digest(inputs)
    out_root = Path(tempfile.mkdtemp(prefix="fuzz-out-"))
    try:
        runs = {
            "info": ["info", "--i", str(particles)],
            "abinit": ["abinit", "--i", str(particles), "--o", str(out_root / "abinit"), "--dry-run", "--quiet",
                       *extra_abinit],
            "reconstruct": ["reconstruct", "--i", str(particles), "--o", str(out_root / "recon"), "--quiet"],
            "convert": ["convert", "--i", str(particles), "--o", str(out_root / "conv" / f"c{particles.suffix}")],
        }
        for name, argv in runs.items():
            err, outp = io.StringIO(), io.StringIO()
            with redirect_stderr(err), redirect_stdout(outp):
                try:
                    rc = cli.run(argv)
                except SystemExit as e:  # argparse
                    rc = e.code
            text = err.getvalue()
            assert rc in (0, 2), f"{name} exit {rc}:\n{text}\n{particles.read_bytes()[:2000]!r}"
            assert "Traceback" not in text, text
            if rc == 2:
                lines = [ln for ln in text.strip().splitlines() if ln.strip()]
                assert lines and all(ln.startswith(f"cryospin {name}: ") for ln in lines), text
                left = [p for p in (out_root / name).rglob("*")] if (out_root / name).exists() else []
                assert not left, f"{name} left {left} after refusing"
        assert _digest(inputs) == before, "an input file changed"
    finally:
        shutil.rmtree(out_root, ignore_errors=True)


@FUZZ
@given(text=star_texts())
def test_fuzzed_star_files(text):
    with tempfile.TemporaryDirectory(prefix="fuzz-star-") as d:
        folder = Path(d)
        _write_stack(folder)
        p = folder / "particles.star"
        p.write_text(text, errors="replace")
        _check_commands(folder, p)


@FUZZ
@given(cfg=st.dictionaries(yaml_keys, yaml_values, max_size=4))
def test_fuzzed_yaml_configs(cfg, tmp_path_factory):
    import yaml

    with tempfile.TemporaryDirectory(prefix="fuzz-yaml-") as d:
        folder = Path(d)
        _write_stack(folder)
        star = folder / "particles.star"
        star.write_text(_good_star())
        y = folder / "c.yaml"
        y.write_text(yaml.safe_dump(cfg))
        _check_commands(folder, star, ["--config", str(y)])


@FUZZ
@given(mode=st.sampled_from([0, 1, 2, 6, 12, 3, 99]), dims=st.tuples(st.integers(0, 12), st.integers(0, 12),
                                                                      st.integers(0, 6)),
       cut=st.integers(-1, 2000), cella=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_fuzzed_mrc_stacks(mode, dims, cut, cella):
    with tempfile.TemporaryDirectory(prefix="fuzz-mrc-") as d:
        folder = Path(d)
        _write_stack(folder)
        raw = bytearray((folder / "stack.mrcs").read_bytes())
        raw[0:16] = np.array([dims[0], dims[1], dims[2], mode], dtype=np.int32).tobytes()  # nx, ny, nz, mode
        raw[40:44] = np.array([cella], dtype=np.float32).tobytes()  # cella x
        if cut >= 0:
            raw = raw[:cut]
        (folder / "stack.mrcs").write_bytes(bytes(raw))
        star = folder / "particles.star"
        star.write_text(_good_star())
        _check_commands(folder, star)


@FUZZ
@given(drop=st.sets(st.sampled_from(["blob/path", "blob/idx", "blob/shape", "blob/psize_A", "ctf/df1_A",
                                     "ctf/accel_kv", "alignments3D/pose", "alignments3D/shift"]), max_size=3),
       odd=st.sampled_from([None, "nan", "zero", "negative", "huge"]),
       n=st.integers(0, 4))
def test_fuzzed_cs_files(drop, odd, n):
    from cryosparc.dataset import Dataset

    with tempfile.TemporaryDirectory(prefix="fuzz-cs-") as d:
        folder = Path(d)
        _write_stack(folder)
        fields = [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "2u4"), ("blob/psize_A", "f4"),
                  ("blob/sign", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"), ("ctf/df_angle_rad", "f4"),
                  ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"), ("ctf/amp_contrast", "f4"),
                  ("alignments3D/pose", "3f4"), ("alignments3D/shift", "2f4")]
        ds = Dataset.allocate(n, [f for f in fields if f[0] not in drop])
        if n:
            values = {"blob/path": ["stack.mrcs"] * n, "blob/idx": np.arange(n) % 4, "blob/shape": [[BOX, BOX]] * n,
                      "blob/psize_A": 2.0, "blob/sign": 1.0, "ctf/df1_A": 15000.0, "ctf/df2_A": 14000.0,
                      "ctf/df_angle_rad": 0.3, "ctf/accel_kv": 300.0, "ctf/cs_mm": 2.7, "ctf/amp_contrast": 0.1,
                      "alignments3D/pose": [[0.1, 0.2, 0.3]] * n, "alignments3D/shift": [[0.5, -0.5]] * n}
            for k, v in values.items():
                if k in ds.fields():
                    ds[k] = v
            bad = {"nan": np.nan, "zero": 0.0, "negative": -3.0, "huge": 1e30}.get(odd or "")
            target = next((f for f in ("blob/psize_A", "ctf/accel_kv", "ctf/df1_A") if f in ds.fields()), None)
            if bad is not None and target is not None:
                ds[target] = bad
        p = folder / "particles.cs"
        ds.save(str(p))
        _check_commands(folder, p)


def _good_star() -> str:
    rows = [f"{i + 1}@stack.mrcs 15000 14000 10 300 2.7 0.1 2.0 {BOX} 1 {10 * i} {20 * i} {5 * i} 0 0 {i % 2 + 1}"
            for i in range(4)]
    labels = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
              "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
              "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
              "rlnRandomSubset"]
    return _block("", labels, [r.split() for r in rows])
