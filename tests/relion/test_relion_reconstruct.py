"""`cryospin reconstruct` against RELION 3.1.3 (relion_project makes the data, relion_reconstruct is the oracle).

(c) 2,000 clean relion_project images (random angles, origins up to 6 A) of a
    pseudo-atomic map: our reconstruction recovers the map (FSC >= 0.9 to 0.8 Nyquist).
(d) 3,000 CTF-modulated images with white noise at SNR 1: our map and
    relion_reconstruct --ctf of the same STAR agree (FSC >= 0.95 to 0.8 Nyquist).
(e) relion_reconstruct reads STAR files written by cryospin (directly, and after
    a STAR -> .cs -> STAR round trip through ``cryospin convert``) and gives the
    same map as from the original STAR.
The test map is synthetic (signal up to Nyquist), so these run without ../shared/data.
The last tests (no RELION needed) check the command's other inputs and outputs:
--box cropping, .cs input, and refusals that write nothing.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryospin_relion import cli
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.read import read_particles, write_particles
from relion_oracle import RELION_MISSING, atoms_map, fsc_curve, min_fsc_to, run_relion, write_pose_star

needs_relion = [pytest.mark.relion,
                pytest.mark.skipif(RELION_MISSING, reason="RELION binaries not on PATH (relion_project not found)")]


def relion_test(fn):
    for mark in needs_relion:
        fn = mark(fn)
    return fn

BOX, APIX = 64, 2.0


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("truth")
    vol = atoms_map(BOX)
    write_mrc(d / "atoms.mrc", vol, APIX)
    return d / "atoms.mrc", vol


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory, truth) -> Path:
    """2,000 clean relion_project images (no CTF); returns the STAR relion_project wrote."""
    d = tmp_path_factory.mktemp("clean")
    write_pose_star(d / "poses.star", 2000, BOX, APIX, seed=21, ctf=False)
    run_relion(["relion_project", "--i", str(truth[0]), "--o", "clean", "--ang", "poses.star"], cwd=d)
    return d / "clean.star"


@pytest.fixture(scope="module")
def noisy_ctf_set(tmp_path_factory, truth) -> tuple[Path, np.ndarray]:
    """3,000 relion_project --ctf images plus white noise at SNR 1 (seeded), and relion_reconstruct --ctf of them."""
    d = tmp_path_factory.mktemp("noisy")
    write_pose_star(d / "poses.star", 3000, BOX, APIX, seed=22, ctf=True)
    run_relion(["relion_project", "--i", str(truth[0]), "--o", "noisy", "--ang", "poses.star", "--ctf"], cwd=d)
    with mrcfile.open(d / "noisy.mrcs", mode="r+") as m:
        data = m.data
        sigma = np.sqrt(data.var(axis=(1, 2), dtype=np.float64).mean() / 1.0)
        data += np.random.default_rng(5).normal(0.0, sigma, data.shape).astype(np.float32)
    run_relion(["relion_reconstruct", "--i", "noisy.star", "--o", "relion.mrc", "--ctf"], cwd=d)
    return d / "noisy.star", mrcfile.read(d / "relion.mrc")


@relion_test
def test_reconstruct_clean_relion_projections_recovers_map(tmp_path, truth, clean_set, capsys):
    out = tmp_path / "rec"
    assert cli.run(["reconstruct", "--i", str(clean_set), "--o", str(out), "--no-ctf", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resolution at FSC 0.143" in printed
    for f in ("map.mrc", "half1_map.mrc", "half2_map.mrc", "fsc.txt"):
        assert (out / f).is_file(), f
    with mrcfile.open(out / "map.mrc") as m:
        ours = np.array(m.data)
        assert float(m.voxel_size.x) == pytest.approx(APIX)
        assert tuple(m.header.origin.item()) == (0.0, 0.0, 0.0) and int(m.header.nxstart) == 0
    curve = fsc_curve(ours, truth[1])
    assert min_fsc_to(curve, BOX) >= 0.9, np.round(curve, 3)
    lines = [ln.split() for ln in (out / "fsc.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == BOX // 2 + 1 and lines[0][1] == "inf"
    assert float(lines[BOX // 2][1]) == pytest.approx(2 * APIX)
    print(f"\n(c) FSC(cryospin map, truth): min to 0.8 Nyquist {min_fsc_to(curve, BOX):.4f}")


@relion_test
def test_reconstruct_agrees_with_relion_reconstruct_ctf(tmp_path, truth, noisy_ctf_set):
    star, relion_map = noisy_ctf_set
    out = tmp_path / "rec"
    assert cli.run(["reconstruct", "--i", str(star), "--o", str(out), "--quiet"]) == 0
    ours = mrcfile.read(out / "map.mrc")
    between = fsc_curve(ours, relion_map)
    ours_truth, relion_truth = fsc_curve(ours, truth[1]), fsc_curve(relion_map, truth[1])
    print(f"\n(d) min FSC to 0.8 Nyquist: cryospin vs relion_reconstruct {min_fsc_to(between, BOX):.4f}; "
          f"vs truth: cryospin {min_fsc_to(ours_truth, BOX):.4f}, RELION {min_fsc_to(relion_truth, BOX):.4f}")
    assert min_fsc_to(between, BOX) >= 0.95, np.round(between, 3)
    # same overall scale (RELION does not normalise images either)
    scale = float((ours * relion_map).sum() / (relion_map**2).sum())
    assert scale == pytest.approx(1.0, abs=0.1)


@relion_test
def test_relion_reads_star_written_by_cryospin(tmp_path, noisy_ctf_set):
    star, relion_map = noisy_ctf_set
    d = star.parent
    table = read_particles(star)
    write_particles(table, d / "written.star")
    write_particles(table, d / "written.cs")
    assert cli.run(["convert", "--i", str(d / "written.cs"), "--o", str(d / "from_cs.star")]) == 0
    for name in ("written.star", "from_cs.star"):
        log = run_relion(["relion_reconstruct", "--i", name, "--o", f"{name}.mrc", "--ctf"], cwd=d)
        assert "Warning" not in log and "WARNING" not in log, log[-2000:]
        curve = fsc_curve(mrcfile.read(d / f"{name}.mrc"), relion_map)
        assert min_fsc_to(curve, BOX) >= 0.95, (name, np.round(curve, 3))
        print(f"\n(e) {name}: min FSC vs relion_reconstruct of the original STAR {min_fsc_to(curve, BOX):.5f}")


# -- no RELION needed: our own projections ---------------------------------------------------------


@pytest.fixture(scope="module")
def own_set(tmp_path_factory, truth) -> Path:
    """800 CTF projections made by `cryospin project` (box 64, 2 A/px); returns their STAR."""
    d = tmp_path_factory.mktemp("own")
    write_pose_star(d / "poses.star", 800, BOX, APIX, seed=23, ctf=True)
    assert cli.run(["project", "--map", str(truth[0]), "--i", str(d / "poses.star"), "--o", str(d / "own.mrcs"),
                    "--ctf", "--quiet"]) == 0
    return d / "own.star"


def test_reconstruct_box_crop_and_cs_input(tmp_path, truth, own_set, capsys):
    import torch

    from cryospin_relion.geometry.fourier import fourier_crop_3d

    out = tmp_path / "crop"
    assert cli.run(["reconstruct", "--i", str(own_set), "--o", str(out), "--box", "32", "--quiet", "--j", "1"]) == 0
    assert "halves: 400 / 400" in capsys.readouterr().out  # rlnRandomSubset of the STAR
    with mrcfile.open(out / "map.mrc") as m:
        crop = np.array(m.data)
        assert crop.shape == (32, 32, 32) and float(m.voxel_size.x) == pytest.approx(2 * APIX)
    small_truth = fourier_crop_3d(torch.as_tensor(truth[1], dtype=torch.float64), 32).numpy()
    assert min_fsc_to(fsc_curve(crop, small_truth), 32) >= 0.95
    assert float((out / "fsc.txt").read_text().splitlines()[-1].split()[1]) == pytest.approx(4 * APIX)
    # the same particles through a cryoSPARC .cs give the same map
    table = read_particles(own_set)
    write_particles(table, tmp_path / "own.cs")
    star_out, cs_out = tmp_path / "from_star", tmp_path / "from_cs"
    assert cli.run(["reconstruct", "--i", str(own_set), "--o", str(star_out), "--quiet"]) == 0
    assert cli.run(["reconstruct", "--i", str(tmp_path / "own.cs"), "--o", str(cs_out), "--quiet"]) == 0
    a, b = mrcfile.read(star_out / "map.mrc"), mrcfile.read(cs_out / "map.mrc")
    assert min_fsc_to(fsc_curve(a, b), BOX) >= 0.999
    assert min_fsc_to(fsc_curve(a, truth[1]), BOX) >= 0.9


def test_reconstruct_refuses_bad_input_and_writes_nothing(tmp_path, own_set, capsys):
    blocks = starfile.read(own_set, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    nopose = own_set.parent / "nopose.star"
    starfile.write(blocks, nopose, overwrite=True)
    out = tmp_path / "never"
    assert cli.run(["reconstruct", "--i", str(nopose), "--o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nopose.star" in err and "rlnAngleRot" in err
    assert cli.run(["reconstruct", "--i", str(own_set), "--o", str(out), "--box", "96"]) == 2
    assert "--box 96" in capsys.readouterr().err
    assert cli.run(["reconstruct", "--i", str(own_set), "--o", str(out), "--tau", "0"]) == 2
    (tmp_path / "afile").write_text("x")
    assert cli.run(["reconstruct", "--i", str(own_set), "--o", str(tmp_path / "afile")]) == 2
    assert not out.exists()
