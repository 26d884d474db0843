"""cryoSPARC .cs reading/writing and .cs <-> STAR round trips on real files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from cryospin_relion.cli import run
from cryospin_relion.errors import InputError
from cryospin_relion.geometry.rotations import cryosparc_pose_to_relion
from cryospin_relion.io.cs import read_cs, write_cs
from cryospin_relion.io.read import read_particles, write_particles


def _geodesic_deg(A, B):
    M = np.einsum("nji,njk->nik", A, B)
    cos = np.clip((np.trace(M, axis1=1, axis2=2) - 1) / 2, -1, 1)
    # arccos loses precision near 1: use the antisymmetric part for small angles
    w = np.stack([M[:, 2, 1] - M[:, 1, 2], M[:, 0, 2] - M[:, 2, 0], M[:, 1, 0] - M[:, 0, 1]], -1)
    return np.degrees(np.arctan2(np.linalg.norm(w, axis=1) / 2, cos))


def test_every_shared_cs_reads_or_is_refused_cleanly(shared_data):
    files = sorted(shared_data.rglob("*.cs"))
    assert files
    for f in files:
        for check in (False, True):
            try:
                t = read_particles(f, check_stacks=check)
            except InputError as e:
                assert "\n" not in str(e) and f.name in str(e)
                continue
            assert len(t) > 0 and (t.apix > 0).all() and t.box > 0


def test_p12_fields_converted(shared_data):
    path = shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    a = np.load(path)
    t = read_cs(path, check_stacks=False)
    assert (len(t), t.box, t.sign, t.source_format) == (2019, 180, -1.0, "cs")
    np.testing.assert_allclose(t.rotations, cryosparc_pose_to_relion(a["alignments3D/pose"].astype(np.float64)))
    np.testing.assert_allclose(t.shifts_A, a["alignments3D/shift"] * a["alignments3D/psize_A"][:, None], rtol=1e-6)
    np.testing.assert_array_equal(t.subset, a["alignments3D/split"] + 1)
    np.testing.assert_allclose(t.ctf.defocus_angle, np.degrees(a["ctf/df_angle_rad"]), rtol=1e-6)
    np.testing.assert_allclose(t.ctf.defocus_u, a["ctf/df1_A"])
    np.testing.assert_allclose(t.ctf.voltage, 200.0)
    assert t.ctf.bfactor.max() == 0 and t.ctf.scale.min() == 1.0
    assert t.stack_indices.tolist()[:3] == a["blob/idx"][:3].tolist()
    assert len(t.extra["missing_stacks"]) == 50


def test_cs_to_star_to_cs_roundtrip(shared_data, tmp_path, capsys):
    """Poses within 1e-4 degrees, shifts within 1e-4 A, through the CLI."""
    src = shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    star, cs = tmp_path / "p.star", tmp_path / "back.cs"
    assert run(["convert", "--i", str(src), "--o", str(star)]) == 0
    assert "blob/sign" in capsys.readouterr().err  # dark-protein images: the user is told to invert
    assert run(["convert", "--i", str(star), "--o", str(cs)]) == 0
    a, b = np.load(src), np.load(cs)  # loadable by plain numpy, like cryoSPARC's own files
    assert len(b) == len(a)
    assert b["alignments3D/pose"].dtype == np.float32 and b["alignments3D/pose"].shape == (len(a), 3)
    assert b["alignments3D/shift"].dtype == np.float32 and b["alignments3D/shift"].shape == (len(a), 2)
    Ra = cryosparc_pose_to_relion(a["alignments3D/pose"].astype(np.float64))
    Rb = cryosparc_pose_to_relion(b["alignments3D/pose"].astype(np.float64))
    assert _geodesic_deg(Ra, Rb).max() < 1e-4
    sa = a["alignments3D/shift"] * a["alignments3D/psize_A"][:, None]
    sb = b["alignments3D/shift"] * b["alignments3D/psize_A"][:, None]
    assert np.abs(sa.astype(np.float64) - sb).max() < 1e-4
    np.testing.assert_array_equal(a["alignments3D/split"], b["alignments3D/split"])
    for f in ("blob/idx", "ctf/df1_A", "ctf/df2_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"):
        np.testing.assert_allclose(a[f], b[f], rtol=1e-6, err_msg=f)
    np.testing.assert_allclose(a["ctf/df_angle_rad"], b["ctf/df_angle_rad"], atol=1e-6)
    assert a["blob/path"].tolist() == b["blob/path"].tolist()
    # STAR has no contrast field: images from STAR are taken as RELION's protein-white (sign +1)
    assert set(a["blob/sign"].tolist()) == {-1.0} and set(b["blob/sign"].tolist()) == {1.0}
    # the intermediate STAR: RELION Euler angles and project-relative image names
    p = starfile.read(star)["particles"]
    assert p["rlnImageName"][0] == "000001@" + a["blob/path"][0].decode()
    t = read_particles(star, check_stacks=False)
    assert _geodesic_deg(t.rotations, Ra).max() < 1e-4


def test_cs_to_cs_keeps_every_field(shared_data, tmp_path):
    src = shared_data / "cryodrgn" / "cryosparc_J2_particles_exported.cs"
    out = tmp_path / "same.cs"
    write_cs(read_cs(src, check_stacks=False, no_ctf=False), out)
    a, b = np.load(src), np.load(out)
    assert set(a.dtype.names) <= set(b.dtype.names)
    for f in a.dtype.names:
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    assert "alignments3D/pose" not in b.dtype.names  # no 3D poses in the input: none invented


def test_leading_gt_stripped_and_micrographs(shared_data, tmp_path):
    src = shared_data / "cryodrgn" / "cryosparc_J2_particles_exported.cs"
    t = read_cs(src, check_stacks=False)
    assert t.extra["stack_names"][0].startswith("J1/imported/")
    write_particles(t, tmp_path / "j2.star")
    p = starfile.read(tmp_path / "j2.star")["particles"]
    assert p["rlnImageName"][0] == "000001@" + t.extra["stack_names"][0]
    assert p["rlnImageName"][1].startswith("000002@")


def test_cs_micrograph_path_becomes_rlnMicrographName(shared_data, tmp_path):
    ds = Dataset.load(shared_data / "cryodrgn" / "cryosparc_J2_particles_exported.cs")
    ds.add_fields([("location/micrograph_path", "O")])
    ds["location/micrograph_path"] = np.array([f">J1/imported/mic{i}.mrc" for i in range(len(ds))], dtype=object)
    ds.save(tmp_path / "m.cs")
    write_particles(read_cs(tmp_path / "m.cs", check_stacks=False), tmp_path / "m.star")
    p = starfile.read(tmp_path / "m.star")["particles"]
    assert p["rlnMicrographName"][3] == "J1/imported/mic3.mrc"


def test_alignments_class_0_prefix(shared_data, tmp_path):
    src = shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    ds = Dataset.load(src)
    ab = ds.rename_prefix("alignments3D", "alignments_class_0")
    ab.save(tmp_path / "abinit.cs")
    t0 = read_cs(src, check_stacks=False)
    t1 = read_cs(tmp_path / "abinit.cs", check_stacks=False)
    np.testing.assert_array_equal(t0.rotations, t1.rotations)
    np.testing.assert_array_equal(t0.shifts_A, t1.shifts_A)


def test_star_to_cs_builds_blob_and_ctf(shared_data, tmp_path):
    t = read_particles(shared_data / "cryodrgn" / "relion31.star")
    out = tmp_path / "r.cs"
    write_particles(t, out)
    b = np.load(out)
    assert [x.decode() for x in b["blob/path"]] == ["relion31.mrcs"] * 5
    assert b["blob/idx"].tolist() == [0, 1, 2, 3, 4]
    assert b["blob/shape"][0].tolist() == [256, 256]
    np.testing.assert_allclose(b["blob/psize_A"], 2.806, rtol=1e-6)
    np.testing.assert_allclose(np.degrees(b["ctf/df_angle_rad"]), -160.39, rtol=1e-5)
    assert b["location/micrograph_path"][0].decode().startswith("Micrographs/18aug10a")
    assert sorted(np.unique(b["alignments3D/split"]).tolist()) == [0, 1]
    t2 = read_cs(out, datadir=shared_data / "cryodrgn")
    assert _geodesic_deg(t.rotations, t2.rotations).max() < 1e-4
    np.testing.assert_allclose(t2.shifts_A, t.shifts_A, atol=1e-5)


def test_star_and_cs_of_same_particles_agree(shared_data):
    d = shared_data / "cryodrgn"
    a = read_particles(d / "empiar_10076_7.star")
    b = read_particles(d / "empiar_10076_7.cs")
    np.testing.assert_allclose(a.apix, b.apix, rtol=1e-5)
    np.testing.assert_allclose(a.ctf.defocus_u, b.ctf.defocus_u, rtol=1e-6)
    np.testing.assert_allclose(a.ctf.defocus_angle, b.ctf.defocus_angle, rtol=1e-5)
    np.testing.assert_array_equal(a.stack_indices, b.stack_indices)
    assert list(a.stack_paths) == list(b.stack_paths)


def test_subset_rows_on_cs(shared_data, tmp_path):
    src = shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    t = read_cs(src, check_stacks=False).subset_rows(np.array([10, 3, 7]))
    write_cs(t, tmp_path / "s.cs")
    a, b = np.load(src), np.load(tmp_path / "s.cs")
    np.testing.assert_array_equal(b["uid"], a["uid"][[10, 3, 7]])


def test_empty_cs_refused(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="no particles"):
            read_cs(shared_data / "cryosparc-tools" / "4k_dataset.cs")
