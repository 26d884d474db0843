"""Catalogue of bad and quirky inputs through `cryospin abinit --dry-run`.

Each bad input must give exit code 2 with one-line messages naming the file and
the field, never a traceback; each quirk that RELION tolerates must be read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryospin_relion import cli

BOX = 16


def _optics(**kw) -> pd.DataFrame:
    d = dict(rlnOpticsGroup=[1], rlnOpticsGroupName=["opticsGroup1"], rlnVoltage=[300.0], rlnSphericalAberration=[2.7],
             rlnAmplitudeContrast=[0.1], rlnImagePixelSize=[2.0], rlnImageSize=[BOX], rlnImageDimensionality=[2])
    d.update(kw)
    return pd.DataFrame(d)


def _particles(n=4, stack="stack.mrcs", **kw) -> pd.DataFrame:
    d = dict(rlnImageName=[f"{i + 1:06d}@{stack}" for i in range(n)], rlnDefocusU=[12000.0] * n,
             rlnDefocusV=[11000.0] * n, rlnDefocusAngle=[30.0] * n, rlnOpticsGroup=[1] * n)
    d.update(kw)
    return pd.DataFrame(d)


def _stack(path: Path, n=4, box=BOX, ny=None, fill=None):
    data = np.random.default_rng(0).normal(size=(n, ny or box, box)).astype(np.float32)
    if fill is not None:
        data[1, 3, 3] = fill
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = 2.0


def _star(path: Path, optics=None, particles=None):
    starfile.write({"optics": _optics() if optics is None else optics,
                    "particles": _particles() if particles is None else particles}, path, overwrite=True)
    return path


def _cs(path: Path, n=4, drop=(), rows=None):
    from cryosparc.dataset import Dataset

    n = n if rows is None else rows
    ds = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
                              ("blob/psize_A", "f4"), ("blob/sign", "f4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
                              ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"),
                              ("ctf/df_angle_rad", "f4"), ("ctf/phase_shift_rad", "f4")])
    if n:
        ds["blob/path"] = ["stack.mrcs"] * n
        ds["blob/idx"] = np.arange(n)
        ds["blob/shape"] = [[BOX, BOX]] * n
        ds["blob/psize_A"] = 2.0
        ds["blob/sign"] = 1.0
        ds["ctf/accel_kv"], ds["ctf/cs_mm"], ds["ctf/amp_contrast"] = 300.0, 2.7, 0.1
        ds["ctf/df1_A"], ds["ctf/df2_A"] = 12000.0, 11000.0
    for f in drop:
        ds.drop_fields([f])
    ds.save(str(path))
    return path


def _case_missing_stack(d):
    return _star(d / "p.star", particles=_particles(stack="nowhere.mrcs")), ["rlnImageName", "nowhere.mrcs", "not found"]


def _case_index_past_end(d):
    p = _particles(n=4)
    p.loc[3, "rlnImageName"] = "000009@stack.mrcs"
    return _star(d / "p.star", particles=p), ["rlnImageName", "row 4", "past the end"]


def _case_no_image_name(d):
    return _star(d / "p.star", particles=_particles().drop(columns=["rlnImageName"])), ["rlnImageName"]


def _case_no_ctf(d):
    return _star(d / "p.star", particles=_particles().drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])), [
        "rlnDefocusU", "--no-ctf"]


def _case_optics_boxes(d):
    o = pd.concat([_optics(), _optics(rlnOpticsGroup=[2], rlnOpticsGroupName=["g2"], rlnImageSize=[32])])
    p = _particles(rlnOpticsGroup=[1, 1, 2, 2])
    return _star(d / "p.star", optics=o, particles=p), ["rlnImageSize"]


def _case_optics_pixel_sizes(d):
    o = pd.concat([_optics(), _optics(rlnOpticsGroup=[2], rlnOpticsGroupName=["g2"], rlnImagePixelSize=[2.5])])
    p = _particles(rlnOpticsGroup=[1, 1, 2, 2])
    return _star(d / "p.star", optics=o, particles=p), ["rlnImagePixelSize", "different pixel sizes"]


def _case_no_pixel_size(d):
    p = _particles().drop(columns=["rlnOpticsGroup"]).assign(rlnVoltage=300.0, rlnSphericalAberration=2.7,
                                                              rlnAmplitudeContrast=0.1)
    starfile.write({"images": p}, d / "p.star", overwrite=True)
    return d / "p.star", ["pixel size", "--angpix"]


def _case_nan_image(d):
    _stack(d / "stack.mrcs", fill=np.nan)
    return _star(d / "p.star"), ["stack.mrcs", "image 2", "NaN"]


def _case_inf_image(d):
    _stack(d / "stack.mrcs", fill=np.inf)
    return _star(d / "p.star"), ["stack.mrcs", "image 2", "inf"]


def _case_non_square(d):
    _stack(d / "stack.mrcs", ny=BOX + 2)
    return _star(d / "p.star"), ["stack.mrcs", "non-square"]


def _case_wrong_box(d):
    _stack(d / "stack.mrcs", box=BOX + 4)
    return _star(d / "p.star"), ["stack.mrcs", "nx", str(BOX)]


def _case_truncated_stack(d):
    data = (d / "stack.mrcs").read_bytes()
    (d / "stack.mrcs").write_bytes(data[: len(data) - 100])
    return _star(d / "p.star"), ["stack.mrcs"]


def _case_stack_not_mrc(d):
    (d / "stack.mrcs").write_bytes(b"this is not an MRC file" * 100)
    return _star(d / "p.star"), ["stack.mrcs"]


def _case_one_particle(d):
    return _star(d / "p.star", particles=_particles(n=1)), ["at least 2 particles"]


def _case_garbled_star(d):
    (d / "p.star").write_text("data_particles\nloop_\n_rlnImageName #1\n\x00\x01garbage @@@ ###\n")
    return d / "p.star", ["p.star"]


def _case_empty_file(d):
    (d / "p.star").write_text("")
    return d / "p.star", ["p.star"]


def _case_model_star(d):
    starfile.write({"model_general": pd.DataFrame({"rlnReferenceDimensionality": [3]})}, d / "model.star", overwrite=True)
    return d / "model.star", ["rlnImageName"]


def _case_unknown_extension(d):
    (d / "p.txt").write_text("hello")
    return d / "p.txt", ["p.txt", ".star or .cs"]


def _case_input_missing(d):
    return d / "absent.star", ["absent.star", "not found"]


def _case_cs_without_blob_path(d):
    return _cs(d / "p.cs", drop=("blob/path",)), ["blob/path"]


def _case_cs_zero_rows(d):
    return _cs(d / "p.cs", rows=0), ["no particles"]


def _case_cs_missing_stack(d):
    (d / "stack.mrcs").unlink()
    return _cs(d / "p.cs"), ["blob/path", "stack.mrcs", "not found"]


def _case_cs_no_ctf(d):
    return _cs(d / "p.cs", drop=("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad")), ["ctf"]


BAD = {name[6:]: fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.fixture
def project(tmp_path, monkeypatch):
    d = tmp_path / "proj"
    d.mkdir()
    _stack(d / "stack.mrcs")
    monkeypatch.chdir(d)
    return d


def _dry_run(capsys, inp, out, *extra) -> tuple[int, str]:
    rc = cli.run(["abinit", "--i", str(inp), "--o", str(out), "--dry-run", "--quiet", *extra])
    err = capsys.readouterr().err
    return rc, err


def test_catalogue_has_at_least_20_bad_inputs():
    assert len(BAD) >= 20


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_with_a_precise_message(project, capsys, case):
    inp, needles = BAD[case](project)
    rc, err = _dry_run(capsys, inp, project / "out")
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("cryospin abinit: error:")]
    assert lines, err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    assert not (project / "out" / "map.mrc").exists()


def test_all_problems_are_reported_at_once(project, capsys):
    _stack(project / "stack.mrcs", fill=np.nan)
    p = _particles(n=4)
    p.loc[2, "rlnImageName"] = "000001@gone.mrcs"
    rc, err = _dry_run(capsys, _star(project / "p.star", particles=p), project / "out")
    assert rc == 2
    assert "gone.mrcs" in err and "NaN" in err


def test_output_is_a_file(project, capsys):
    (project / "out").write_text("x")
    rc, err = _dry_run(capsys, _star(project / "p.star"), project / "out")
    assert rc == 2 and "--o" in err


def test_bad_config(project, capsys):
    (project / "cfg.yaml").write_text("heads: 3\nno_such_option: 1\n")
    rc, err = _dry_run(capsys, _star(project / "p.star"), project / "out", "--config", str(project / "cfg.yaml"))
    assert rc == 2 and "no_such_option" in err


def test_odd_box_flag(project, capsys):
    rc, err = _dry_run(capsys, _star(project / "p.star"), project / "out", "--box", "15")
    assert rc == 2 and "box" in err


def test_good_input_passes(project, capsys):
    rc, err = _dry_run(capsys, _star(project / "p.star"), project / "out")
    assert rc == 0, err


# --- real files with header quirks (../shared/data) ---------------------------------------------

@pytest.mark.parametrize("name, rc, needle", [
    ("cryodrgn/relion31.star", 0, None),  # stack without the "MAP " id and with a zero machine stamp
    ("cryodrgn/relion31.v2.star", 0, None),  # particles block before optics
    ("cryodrgn/empiar_10076_7.star", 0, None),  # RELION 3.0 table; .mrc stack with cella 0
    ("cryodrgn/empiar_10076_7.cs", 0, None),  # the same particles from cryoSPARC
    ("aspire/sample_particles_relion31.star", 0, None),  # two optics groups, [comment] column
    ("cryodrgn/relion5.star", 2, "448"),  # RELION 5 bracket arrays; its toy stacks are 30 px, not 448
    ("cryodrgn/cryosparc_J2_particles_exported.cs", 2, "not found"),  # '>' paths, stacks absent
    ("cryosparc-tools/4k_dataset.cs", 2, "no particles"),  # zero rows
    ("cryodrgn/relion31.6opticsgroups.star", 2, "not found"),  # stacks absent
    ("cylindra/Refine3D__job_refine__run_it050_data.star", 2, "3D"),  # sub-tomograms
    ("aspire/sample_data_model.star", 2, "rlnImageName"),  # a model.star
])
def test_real_files(shared_data, tmp_path, capsys, monkeypatch, name, rc, needle):
    src = shared_data / name
    if not src.exists():
        pytest.skip(f"{src} absent")
    monkeypatch.chdir(src.parent)
    got, err = _dry_run(capsys, src, tmp_path / "out")
    assert got == rc, err
    assert "Traceback" not in err
    if needle:
        assert needle in err
