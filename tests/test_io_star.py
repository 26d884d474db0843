"""RELION STAR reading/writing against real files and small synthetic projects."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import tiny_optics, tiny_particles, write_stack_file, write_star_file

from cryospin_relion.errors import InputError
from cryospin_relion.geometry.rotations import euler_to_matrix_np
from cryospin_relion.io.read import read_particles, write_particles
from cryospin_relion.io.star import read_star, write_star


def _geodesic_deg(A, B):
    M = np.einsum("nji,njk->nik", A, B)
    return np.degrees(np.arccos(np.clip((np.trace(M, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def test_every_shared_star_reads_or_is_refused_cleanly(shared_data):
    """No exception other than InputError escapes, with or without stack checks."""
    files = sorted(shared_data.rglob("*.star"))
    assert files
    read = 0
    for f in files:
        for check in (False, True):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = read_particles(f, check_stacks=check, datadir=f.parent)
            except InputError as e:
                msg = str(e)
                assert "\n" not in msg and f.name in msg, msg
                continue
            read += 1
            n = len(t)
            assert n > 0 and t.stack_indices.shape == (n,) and t.apix.shape == (n,) and (t.apix > 0).all()
            if t.rotations is not None:
                assert t.rotations.shape == (n, 3, 3) and t.shifts_A.shape == (n, 2)
    assert read >= 10


def test_known_real_files(shared_data):
    d = shared_data
    t = read_star(d / "cryodrgn" / "relion31.star")
    assert (len(t), t.box, t.source_format) == (5, 256, "star31")
    np.testing.assert_allclose(t.apix, 2.806)
    np.testing.assert_allclose(t.shifts_A[0], [0.019324, -0.64686])
    np.testing.assert_allclose(t.rotations[0], euler_to_matrix_np([-102.30296, 82.318041, 124.706463]))
    np.testing.assert_allclose(t.ctf.defocus_u[0], 13108.082418)
    np.testing.assert_allclose(t.ctf.cs, 0.01)
    assert Path(t.stack_paths[0]).name == "relion31.mrcs" and Path(t.stack_paths[0]).is_absolute()
    assert t.stack_indices.tolist() == [0, 1, 2, 3, 4]

    # RELION 3.0.6: pixel size from detector pixel / magnification, origins in pixels
    with pytest.warns(RuntimeWarning, match="rlnAmplitudeContrast"):  # absent in this real file: RELION uses 0
        t = read_star(d / "cryodrgn" / "FinalRefinement-OriginalParticles-PfCRT.star", check_stacks=False)
    np.testing.assert_allclose(t.apix, 1.035)
    np.testing.assert_allclose(t.shifts_A[0], np.array([-0.14063, -0.04688]) * 1.035)
    assert t.subset.tolist() == [2, 1, 2, 2, 2] and t.source_format == "star30"
    assert len(t.extra["missing_stacks"]) == 1

    # 3.1 file with pixel rlnOriginX/Y (as RELION 3.1.3's relion_project writes)
    t = read_star(d / "aspire" / "rln_proj_65_shifted.star", no_ctf=True)
    np.testing.assert_allclose(t.shifts_A, [[6, 10], [10, -5], [-8, 11], [-13, -3]])
    assert t.ctf is None and t.box == 65

    # 3.0 with rlnDetectorPixelSize only (magnification defaults to 10000), stack found through datadir
    t = read_star(d / "tomodrgn" / "10076_classE_32_sim.star", datadir=d / "tomodrgn")
    np.testing.assert_allclose(t.apix, 13.1)
    assert t.box == 32 and len(t) == 720

    # 3.0 without rlnImageSize: box from the stack header
    t = read_star(d / "aspire" / "sample_particles_relion30.star")
    assert t.box == 200
    np.testing.assert_allclose(t.apix, 5.0 * 1e4 / 37369.207031, rtol=1e-6)


def test_block_order_does_not_matter(shared_data):
    a = read_star(shared_data / "cryodrgn" / "relion31.star")
    b = read_star(shared_data / "cryodrgn" / "relion31.v2.star")
    for f in ("stack_paths", "stack_indices", "apix", "rotations", "shifts_A", "subset", "optics_group"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    for k, v in a.ctf.as_dict().items():
        np.testing.assert_array_equal(v, getattr(b.ctf, k), err_msg=k)
    assert a.box == b.box


def test_six_optics_groups_per_particle_pixel_size(shared_data, tmp_path):
    path = shared_data / "cryodrgn" / "relion31.6opticsgroups.star"
    t = read_star(path, check_stacks=False)
    blocks = starfile.read(path)
    opt = blocks["optics"].set_index("rlnOpticsGroup")
    og = blocks["particles"]["rlnOpticsGroup"].to_numpy()
    np.testing.assert_array_equal(t.optics_group, og)
    np.testing.assert_allclose(t.apix, opt.loc[og, "rlnImagePixelSize"].to_numpy())
    np.testing.assert_allclose(t.ctf.cs, opt.loc[og, "rlnSphericalAberration"].to_numpy())
    assert len(np.unique(t.apix)) == 2 and len(t.extra["missing_stacks"]) == 139
    # written back: same groups, names and per-group values, brackets passed through
    out = tmp_path / "six.star"
    write_star(t, out)
    back = starfile.read(out)
    o2 = back["optics"].set_index("rlnOpticsGroup")
    assert sorted(o2.index) == sorted(opt.index)
    for c in ("rlnOpticsGroupName", "rlnImagePixelSize", "rlnOddZernike", "rlnBeamTiltX"):
        assert (o2.loc[opt.index, c].to_numpy() == opt[c].to_numpy()).all(), c
    t2 = read_star(out, check_stacks=False)
    np.testing.assert_allclose(t2.apix, t.apix)


def test_relion5_brackets_pass_through(shared_data, tmp_path):
    t = read_star(shared_data / "cryodrgn" / "relion5.star", check_stacks=False)
    out = tmp_path / "r5.star"
    write_star(t, out)
    a, b = starfile.read(shared_data / "cryodrgn" / "relion5.star"), starfile.read(out)
    assert b["optics"]["rlnOddZernike"][0] == a["optics"]["rlnOddZernike"][0]
    assert b["optics"]["rlnCtfDataAreCtfPremultiplied"][0] == 0
    assert (b["particles"]["rlnImageName"] == a["particles"]["rlnImageName"]).all()


def test_write_read_roundtrip_keeps_columns(shared_data, tmp_path):
    src = shared_data / "cryodrgn" / "relion31.star"
    t = read_star(src)
    out = tmp_path / "rt.star"
    write_particles(t, out)
    back = starfile.read(out)
    orig = starfile.read(src)
    p = back["particles"]
    for c in orig["particles"].columns:
        assert c in p.columns, c
    np.testing.assert_array_equal(p["rlnCoordinateX"], orig["particles"]["rlnCoordinateX"])
    assert p["rlnImageName"].tolist() == orig["particles"]["rlnImageName"].tolist()
    assert set(p["rlnRandomSubset"]) == {1, 2}  # the input had only subset 1: rebalanced
    t2 = read_star(out, datadir=src.parent)
    assert _geodesic_deg(t.rotations, t2.rotations).max() < 1e-5
    np.testing.assert_allclose(t2.shifts_A, t.shifts_A, atol=1e-9)
    for k, v in t.ctf.as_dict().items():
        np.testing.assert_allclose(getattr(t2.ctf, k), v, rtol=1e-9, err_msg=k)


def test_star30_written_as_31(shared_data, tmp_path):
    t = read_star(shared_data / "aspire" / "sample_particles_relion30.star")
    out = tmp_path / "as31.star"
    write_star(t, out)
    b = starfile.read(out)
    assert {"optics", "particles"} <= set(b)
    p = b["particles"]
    for c in ("rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage"):
        assert c not in p.columns, c
    assert {"rlnOriginXAngst", "rlnOriginYAngst", "rlnCoordinateX", "rlnClassNumber"} <= set(p.columns)
    assert b["optics"]["rlnImageSize"][0] == 200
    np.testing.assert_allclose(b["optics"]["rlnImagePixelSize"][0], t.apix[0])
    t2 = read_star(out, datadir=shared_data / "aspire")
    np.testing.assert_allclose(t2.shifts_A, t.shifts_A, atol=1e-8)
    assert _geodesic_deg(t.rotations, t2.rotations).max() < 1e-5


def test_path_resolution_order(tmp_path, monkeypatch):
    project = tmp_path / "project"
    in_cwd = write_stack_file(project / "Extract" / "a.mrcs", seed=1)
    star = write_star_file(project / "Select" / "p.star", tiny_particles("Extract/a.mrcs"), tiny_optics())
    next_to_star = write_stack_file(project / "Select" / "Extract" / "a.mrcs", seed=2)
    datadir = tmp_path / "elsewhere"
    write_stack_file(datadir / "a.mrcs", seed=3)
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()

    monkeypatch.chdir(project)  # 1. the working directory (RELION's project-relative rule)
    t = read_star(star, datadir=datadir)
    assert Path(t.stack_paths[0]) == project / "Extract" / "a.mrcs"
    assert t.stack_indices.tolist() == [0, 1, 2, 3]
    monkeypatch.chdir(elsewhere)  # 2. the STAR file's folder
    t = read_star(star, datadir=datadir)
    assert Path(t.stack_paths[0]) == project / "Select" / "Extract" / "a.mrcs"
    (project / "Select" / "Extract" / "a.mrcs").unlink()
    t = read_star(star, datadir=datadir)  # 3. datadir (by file name)
    assert Path(t.stack_paths[0]) == datadir / "a.mrcs"
    with pytest.raises(InputError) as e:
        read_star(star)
    assert all(s in str(e.value) for s in ("p.star", "row 1", "rlnImageName", "Extract/a.mrcs"))
    t = read_star(star, check_stacks=False)
    assert t.extra["missing_stacks"] == ["Extract/a.mrcs"] and t.stack_paths[0] == "Extract/a.mrcs"
    assert in_cwd.shape == next_to_star.shape


def test_mrc_extension_and_name_without_index(tmp_path):
    write_stack_file(tmp_path / "s.mrc", n=1, box=8)
    cols = tiny_particles("s.mrc", n=1)
    cols["rlnImageName"] = ["s.mrc"]  # no N@: the file is the image
    t = read_star(write_star_file(tmp_path / "one.star", cols, tiny_optics(box=8)))
    assert t.stack_indices.tolist() == [0] and t.box == 8


def test_written_subsets_balanced_and_seeded(tmp_path):
    write_stack_file(tmp_path / "a.mrcs", n=7)
    cols = tiny_particles("a.mrcs", n=7)
    t = read_star(write_star_file(tmp_path / "p.star", cols, tiny_optics()))
    assert t.subset is None
    write_star(t, tmp_path / "o1.star")
    write_star(t, tmp_path / "o2.star")
    s1 = starfile.read(tmp_path / "o1.star")["particles"]["rlnRandomSubset"].to_numpy()
    s2 = starfile.read(tmp_path / "o2.star")["particles"]["rlnRandomSubset"].to_numpy()
    np.testing.assert_array_equal(s1, s2)
    assert sorted(np.bincount(s1)[1:].tolist()) == [3, 4]


def test_subset_rows_writes_selected_rows(shared_data, tmp_path):
    t = read_star(shared_data / "cryodrgn" / "relion31.star").subset_rows(np.array([4, 1]))
    assert len(t) == 2 and t.stack_indices.tolist() == [4, 1]
    write_star(t, tmp_path / "sub.star")
    p = starfile.read(tmp_path / "sub.star")["particles"]
    assert p["rlnImageName"].tolist() == ["000005@relion31.mrcs", "000002@relion31.mrcs"]


def test_mixed_pixel_sizes_in_one_group_split_on_write(tmp_path):
    write_stack_file(tmp_path / "a.mrcs", n=4)
    t = read_star(write_star_file(tmp_path / "p.star", tiny_particles("a.mrcs"), tiny_optics()))
    t.apix = np.array([1.0, 1.0, 1.5, 1.5])
    write_star(t, tmp_path / "o.star")
    b = starfile.read(tmp_path / "o.star")
    assert len(b["optics"]) == 2
    t2 = read_star(tmp_path / "o.star")
    np.testing.assert_allclose(t2.apix, t.apix)


@pytest.mark.relion
def test_relion_star_handler_reads_our_star(shared_data, tmp_path, relion):
    """RELION 3.1 parses what we write (optics, Angstrom origins, subsets)."""
    t = read_star(shared_data / "aspire" / "sample_particles_relion30.star")
    ours = tmp_path / "ours.star"
    write_star(t, ours)
    r = subprocess.run([f"{relion}/relion_star_handler", "--i", str(ours), "--o", str(tmp_path / "copy.star"),
                        "--select", "rlnRandomSubset", "--minval", "1", "--maxval", "1"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    copy = starfile.read(tmp_path / "copy.star")
    ours_df = starfile.read(ours)["particles"]
    assert len(copy["particles"]) == int((ours_df["rlnRandomSubset"] == 1).sum())
    np.testing.assert_allclose(copy["optics"]["rlnImagePixelSize"][0], t.apix[0], rtol=1e-5)
    sel = ours_df[ours_df["rlnRandomSubset"] == 1].reset_index(drop=True)
    np.testing.assert_allclose(copy["particles"]["rlnAngleRot"], sel["rlnAngleRot"], atol=1e-5)
    np.testing.assert_allclose(copy["particles"]["rlnOriginXAngst"], sel["rlnOriginXAngst"], atol=1e-5)
    assert isinstance(copy["particles"], pd.DataFrame)
