"""`cryospin project` against RELION 3.1.3's relion_project (the oracle), and RELION's own STAR conventions.

- relion_project --ang reads rlnOriginX/YAngst from a 3.1 STAR, converts a 3.0
  STAR's pixel rlnOriginX/Y, and writes rlnOriginX/YAngst back; our projections
  of the same STAR match its images (correlation >= 0.99, same scale), with and
  without --ctf (defocus, astigmatism, phase shift, B-factor).
- Quirk: with --nr_uniform/--sigma_offset, relion_project 3.1.3 writes random
  *pixel* rlnOriginX/Y into a 3.1 STAR but does not shift the images, and its
  --ang ignores pixel origins in a 3.1 STAR.
- The RELION projections committed in ../shared/data/aspire (64 and 65 px,
  centred and shifted) are reproduced; for the odd box RELION's images sit 1 px
  further in +x and +y.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryospin_relion import cli
from cryospin_relion.io.mrc import write_mrc
from relion_oracle import (
    blobs_map, correlations, ribosome_64, run_relion, write_pose_star,
)

BOX, APIX, N_IMG = 64, 2.0, 24


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> dict:
    """name -> MRC path (box 64, voxel 2 A): asymmetric blobs, and the ribosome when the shared data exist."""
    d = tmp_path_factory.mktemp("maps")
    out = {}
    write_mrc(d / "blobs.mrc", blobs_map(BOX), APIX)
    out["blobs"] = d / "blobs.mrc"
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if shared.is_dir():
        write_mrc(d / "ribosome64.mrc", ribosome_64(shared), APIX)
        out["ribosome"] = d / "ribosome64.mrc"
    return out


def _project_both(tmp: Path, map_path: Path, star: Path, ctf: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(RELION images, our images, RELION's output STAR text) for the same map and STAR."""
    args = ["relion_project", "--i", str(map_path), "--o", "relion", "--ang", star.name]
    run_relion(args + (["--ctf"] if ctf else []), cwd=tmp)
    ours = tmp / "ours.mrcs"
    rc = cli.run(["project", "--map", str(map_path), "--i", str(star), "--o", str(ours), "--quiet"]
                 + (["--ctf"] if ctf else []))
    assert rc == 0
    return mrcfile.read(tmp / "relion.mrcs"), mrcfile.read(ours), (tmp / "relion.star").read_text()


@pytest.mark.relion
@pytest.mark.parametrize("ctf", [False, True], ids=["noctf", "ctf"])
@pytest.mark.parametrize("style", ["3.1", "3.0"], ids=["star31_angst", "star30_pixels"])
@pytest.mark.parametrize("name", ["blobs", "ribosome"])
def test_project_matches_relion_project(tmp_path, maps, name, style, ctf):
    if name not in maps:
        pytest.skip("ribosome map needs ../shared/data/aspire (real test data not found)")
    star = tmp_path / "poses.star"
    parts = write_pose_star(star, N_IMG, BOX, APIX, seed=11, ctf=ctf, style=style)
    rel, ours, rel_star = _project_both(tmp_path, maps[name], star, ctf)
    assert rel.shape == ours.shape == (N_IMG, BOX, BOX)
    corr = correlations(rel, ours)
    assert corr.min() >= 0.99, f"per-image correlation with relion_project: {np.round(corr, 4)}"
    scale = ours.std(axis=(1, 2)) / rel.std(axis=(1, 2))
    assert np.allclose(scale, 1.0, atol=0.02), f"image scale ours/RELION {np.round(scale, 4)}"
    # RELION 3.1 writes Angstrom origins for --ang input, converting a 3.0 STAR's pixel origins
    out = starfile.read(tmp_path / "relion.star", always_dict=True)["particles"]
    assert "rlnOriginXAngst" in out.columns and "rlnOriginX" not in out.columns, rel_star[:400]
    expect_x = parts["rlnOriginXAngst"] if style == "3.1" else parts["rlnOriginX"] * APIX
    assert np.allclose(out["rlnOriginXAngst"], expect_x, atol=1e-4)
    # our STAR points at our stack and keeps the poses
    mine = starfile.read(tmp_path / "ours.star", always_dict=True)["particles"]
    assert mine["rlnImageName"].iloc[0] == f"000001@{tmp_path / 'ours.mrcs'}"
    assert np.allclose(mine["rlnAngleTilt"], parts["rlnAngleTilt"], atol=1e-4)
    with mrcfile.open(tmp_path / "ours.mrcs") as m:
        assert float(m.voxel_size.x) == pytest.approx(APIX)


@pytest.mark.relion
def test_relion_project_random_origins_are_not_applied(tmp_path, maps):
    """RELION 3.1.3 quirk: --nr_uniform --sigma_offset writes pixel rlnOriginX/Y in a 3.1 STAR, images unshifted."""
    run_relion(["relion_project", "--i", str(maps["blobs"]), "--o", "uni", "--nr_uniform", "6",
                "--sigma_offset", "4", "--angpix", str(APIX)], cwd=tmp_path)
    blocks = starfile.read(tmp_path / "uni.star", always_dict=True)
    parts = blocks["particles"]
    assert "optics" in blocks and "rlnOriginX" in parts.columns and "rlnOriginXAngst" not in parts.columns
    assert np.abs(parts[["rlnOriginX", "rlnOriginY"]].to_numpy()).max() > 0.5  # random pixel origins were written
    rel = mrcfile.read(tmp_path / "uni.mrcs")
    # ...but the images are the centred projections: compare with ours at zero origin
    zero = parts.drop(columns=["rlnOriginX", "rlnOriginY"]).assign(rlnOriginXAngst=0.0, rlnOriginYAngst=0.0)
    starfile.write({"optics": blocks["optics"], "particles": zero}, tmp_path / "zero.star", overwrite=True)
    # (the output STAR, zero_proj.star, must not be the input: project refuses to replace an input)
    assert cli.run(["project", "--map", str(maps["blobs"]), "--i", str(tmp_path / "zero.star"),
                    "--o", str(tmp_path / "zero_proj.mrcs"), "--quiet"]) == 0
    assert correlations(rel, mrcfile.read(tmp_path / "zero_proj.mrcs")).min() >= 0.999
    # and relion_project --ang ignores those pixel origins in a 3.1 STAR
    run_relion(["relion_project", "--i", str(maps["blobs"]), "--o", "again", "--ang", "uni.star"], cwd=tmp_path)
    assert correlations(rel, mrcfile.read(tmp_path / "again.mrcs")).min() >= 0.9999


# -- committed RELION projections (ASPIRE test data): no RELION binary needed -----------------------


@pytest.mark.parametrize("kind", ["centered", "shifted"])
def test_reproduces_committed_relion_projections_64(tmp_path, shared_data, kind):
    """rln_proj_64_*: RELION projections of the ribosome downsampled to 64 (pixel origins in the shifted STAR)."""
    d = shared_data / "aspire"
    write_mrc(tmp_path / "ribosome64.mrc", ribosome_64(shared_data), 1.0)  # the STAR says 1 A/px
    out = tmp_path / "ours.mrcs"
    assert cli.run(["project", "--map", str(tmp_path / "ribosome64.mrc"), "--i", str(d / f"rln_proj_64_{kind}.star"),
                    "--o", str(out), "--quiet"]) == 0
    with mrcfile.open(d / f"rln_proj_64_{kind}.mrcs", permissive=True) as m:
        rel = np.array(m.data)
    corr = correlations(rel, mrcfile.read(out))
    assert corr.min() >= 0.99, np.round(corr, 4)


@pytest.mark.parametrize("kind", ["centered", "shifted"])
def test_reproduces_committed_relion_projections_65_with_odd_box_offset(tmp_path, shared_data, kind):
    """rln_proj_65_*: for an odd box RELION's images are offset by +1 px in x and y relative to ours."""
    d = shared_data / "aspire"
    out = tmp_path / "ours.mrcs"
    assert cli.run(["project", "--map", str(d / "clean70SRibosome_vol_65p.mrc"),
                    "--i", str(d / f"rln_proj_65_{kind}.star"), "--o", str(out), "--quiet"]) == 0
    with mrcfile.open(d / f"rln_proj_65_{kind}.mrcs", permissive=True) as m:
        rel = np.array(m.data)
    ours = mrcfile.read(out)
    shifted = np.roll(ours, (1, 1), axis=(1, 2))  # +1 px in y and x
    assert correlations(rel, shifted).min() >= 0.99, np.round(correlations(rel, shifted), 4)
    assert correlations(rel, ours).max() < 0.95  # without the offset they do not match: the quirk is real


def test_project_rejects_box_mismatch_and_missing_poses(tmp_path, maps, capsys):
    star = tmp_path / "poses.star"
    write_pose_star(star, 3, 48, APIX, seed=1, ctf=False)
    assert cli.run(["project", "--map", str(maps["blobs"]), "--i", str(star), "--o", str(tmp_path / "x.mrcs")]) == 2
    err = capsys.readouterr().err
    assert "blobs.mrc" in err and "poses.star" in err and "48" in err and "64" in err
    nopose = tmp_path / "nopose.star"
    parts = write_pose_star(nopose, 3, 64, APIX, seed=1, ctf=False)
    blocks = starfile.read(nopose, always_dict=True)
    blocks["particles"] = parts.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]).assign(rlnOpticsGroup=1)
    starfile.write(blocks, nopose, overwrite=True)
    assert cli.run(["project", "--map", str(maps["blobs"]), "--i", str(nopose), "--o", str(tmp_path / "y.mrcs")]) == 2
    assert "rlnAngleRot" in capsys.readouterr().err
    assert not (tmp_path / "x.mrcs").exists() and not (tmp_path / "y.mrcs").exists()


def test_project_noise_snr_and_header_warning(tmp_path, maps, capsys):
    star = tmp_path / "poses.star"
    write_pose_star(star, 40, BOX, APIX, seed=2, ctf=True)
    clean, noisy = tmp_path / "clean.mrcs", tmp_path / "noisy.mrcs"
    assert cli.run(["project", "--map", str(maps["blobs"]), "--i", str(star), "--o", str(clean), "--ctf", "--quiet"]) == 0
    assert cli.run(["project", "--map", str(maps["blobs"]), "--i", str(star), "--o", str(noisy), "--ctf",
                    "--noise-snr", "0.5", "--seed", "3", "--quiet"]) == 0
    c, n = mrcfile.read(clean), mrcfile.read(noisy)
    snr = c.var(axis=(1, 2)).mean() / (n - c).var()
    assert snr == pytest.approx(0.5, rel=0.05)
    # a map whose header voxel size differs from the STAR's pixel size: warning, STAR wins
    write_mrc(tmp_path / "vox3.mrc", blobs_map(BOX), 3.0)
    capsys.readouterr()
    assert cli.run(["project", "--map", str(tmp_path / "vox3.mrc"), "--i", str(star), "--o",
                    str(tmp_path / "w.mrcs"), "--quiet"]) == 0
    assert "voxel size 3" in capsys.readouterr().err
    with mrcfile.open(tmp_path / "w.mrcs") as m:
        assert float(m.voxel_size.x) == pytest.approx(APIX)
