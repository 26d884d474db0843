"""cryospin simulate: the written STAR/stack match the forward model, SNR, map/model inputs, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryospin_relion import cli
from cryospin_relion.evaluate.simulate import (
    SimulationConfig, load_map, model_to_map, resample_volume, simulate_images, structure_to_map,
)
from cryospin_relion.evaluate.synthetic import make_structure
from cryospin_relion.geometry.ctf import CTF, ctf_2d
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.shifts import origin_to_translation
from cryospin_relion.geometry.slicing import volume_to_projector
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.read import read_particles

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def blob_volume(n: int = 32, seed: int = 0) -> np.ndarray:
    """A few Gaussian blobs, asymmetric, centre of the box n // 2."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    v = np.zeros((n, n, n), np.float32)
    for _ in range(6):
        c = rng.uniform(-n / 5, n / 5, 3)
        s = rng.uniform(1.5, 3.0)
        v += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)).astype(np.float32)
    return v


@pytest.fixture
def blob_map(tmp_path):
    p = tmp_path / "blob.mrc"
    write_mrc(p, blob_volume(32), 2.0)
    return p


def _project_table(truth: np.ndarray, table) -> np.ndarray:
    spec = volume_to_projector(torch.as_tensor(truth), pad=2)
    apix = torch.as_tensor(table.apix, dtype=torch.float32)
    ctf = None if table.ctf is None else ctf_2d(table.box, apix, CTF.from_arrays(table.ctf))
    trans = origin_to_translation(torch.as_tensor(table.shifts_A, dtype=torch.float32), apix)
    rot = torch.as_tensor(table.rotations, dtype=torch.float32)
    return project_spectrum(spec, rot, table.box, translations_px=trans, ctf=ctf).numpy()


@pytest.mark.parametrize("ctf", [True, False])
def test_images_equal_projections_at_star_poses(tmp_path, blob_map, ctf):
    out = tmp_path / "sim"
    argv = ["simulate", "--map", str(blob_map), "--o", str(out), "--n", "24", "--box", "32", "--apix", "2",
            "--snr", "inf", "--shift-std", "3", "--seed", "3", "--quiet"]
    assert cli.run(argv + ([] if ctf else ["--no-ctf"])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ground_truth.mrc", "particles.mrcs", "particles.star"]
    table = read_particles(out / "particles.star", no_ctf=not ctf)
    assert len(table) == 24 and table.box == 32 and np.allclose(table.apix, 2.0)
    assert (table.ctf is not None) == ctf
    assert sorted(np.bincount(table.subset)[1:].tolist()) == [12, 12]
    assert "particles.mrcs" in (out / "particles.star").read_text()  # relative to the STAR folder
    with mrcfile.open(out / "particles.mrcs") as m:
        imgs = np.array(m.data)
        assert m.voxel_size.x == pytest.approx(2.0)
    with mrcfile.open(out / "ground_truth.mrc") as m:
        truth = np.array(m.data)
        assert m.voxel_size.x == pytest.approx(2.0)
    np.testing.assert_allclose(truth, blob_volume(32), atol=1e-6)  # no noise: no rescaling
    ref = _project_table(truth, table)
    err = np.abs(ref - imgs).max() / np.abs(ref).max()
    assert err < 1e-4, err
    # protein-positive: the clean images integrate to a positive number
    assert imgs.sum(axis=(1, 2)).min() > 0
    # shifts were really applied (std 3 px)
    assert 1.5 < np.std(table.shifts_A / 2.0) < 4.5


def test_snr_is_honoured_and_noise_is_unit(tmp_path):
    vol = blob_volume(32)
    clean, s0 = simulate_images(vol, 2.0, SimulationConfig(n=300, snr=math.inf, seed=5))
    noisy, s1 = simulate_images(vol, 2.0, SimulationConfig(n=300, snr=0.05, seed=5))
    assert s0.scale == 1.0 and s1.scale == pytest.approx(s1.noise_sigma)
    noise = noisy - clean / s1.scale
    assert np.std(noise) == pytest.approx(1.0, rel=0.02)
    snr = np.var(clean) / np.var(noise * s1.scale)
    assert snr == pytest.approx(0.05, rel=0.10)


def test_simulate_10000_is_fast(tmp_path):
    import time

    vol = blob_volume(64)
    t0 = time.perf_counter()
    imgs, _ = simulate_images(vol, 2.0, SimulationConfig(n=10000, snr=0.1, seed=1))
    dt = time.perf_counter() - t0
    assert imgs.shape == (10000, 64, 64)
    assert dt < 60, dt


def test_resample_keeps_centre_and_scales():
    n = 32
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    v = np.exp(-((x - 3) ** 2 + y**2 + z**2) / (2 * 2.0**2)).astype(np.float32)  # 3 voxels off centre in x
    out, got = resample_volume(v, 2.0, 64, 1.0)
    assert got == pytest.approx(1.0) and out.shape == (64,) * 3
    zz, yy, xx = np.meshgrid(*(np.arange(64) - 32,) * 3, indexing="ij")
    w = out.clip(0)
    assert (w * xx).sum() / w.sum() == pytest.approx(6.0, abs=0.05)  # 3 voxels of 2 A = 6 voxels of 1 A
    assert abs((w * yy).sum() / w.sum()) < 0.05
    # a non-integer ratio (0.9 -> 1.3 A/px)
    out2, got2 = resample_volume(v, 0.9, 32, 1.3)
    assert got2 == pytest.approx(1.3, rel=2e-3)
    w = out2.clip(0)
    zz, yy, xx = np.meshgrid(*(np.arange(32) - 16,) * 3, indexing="ij")
    assert (w * xx).sum() / w.sum() == pytest.approx(3 * 0.9 / 1.3, abs=0.1)


def test_map_input_resampled_by_voxel_ratio(tmp_path, blob_map):
    v = load_map(blob_map, 48, 1.0)  # 32 px at 2 A -> 64 px at 1 A, cropped to 48
    assert v.shape == (48,) * 3
    assert np.unravel_index(np.argmax(v), v.shape) != (0, 0, 0)


def _com(v: np.ndarray) -> np.ndarray:
    w = v.clip(0)
    idx = np.indices(v.shape)
    return np.array([(w * idx[k]).sum() / w.sum() for k in range(3)])


def test_generated_structure_to_map():
    st = make_structure(120, seed=4)
    v = structure_to_map(st, 48, 1.5)
    assert v.shape == (48,) * 3 and np.isfinite(v).all()
    assert v.max() > 0 and v.sum() > 0
    np.testing.assert_allclose(_com(v), 24, atol=1.0)  # centred on the model's centre of mass
    assert abs(v[0]).max() < 0.05 * v.max()  # nothing wraps to the edges


def test_model_file_1uao(tmp_path):
    pdb = DATA / "cryojax" / "1uao.pdb"
    if not pdb.is_file():
        pytest.skip(f"shared data absent: {pdb}")
    v = model_to_map(pdb, 32, 1.0)
    assert v.shape == (32,) * 3 and v.max() > 0
    np.testing.assert_allclose(_com(v), 16, atol=0.7)
    out = tmp_path / "sim"
    assert cli.run(["simulate", "--model", str(pdb), "--o", str(out), "--n", "8", "--box", "32",
                    "--apix", "1.0", "--quiet"]) == 0
    assert len(read_particles(out / "particles.star")) == 8


def test_generated_model_file_via_cli(tmp_path):
    pdb = tmp_path / "gen.pdb"
    make_structure(80, seed=2).write_pdb(str(pdb))
    out = tmp_path / "sim"
    assert cli.run(["simulate", "--model", str(pdb), "--o", str(out), "--n", "6", "--box", "40",
                    "--apix", "1.5", "--quiet"]) == 0
    with mrcfile.open(out / "ground_truth.mrc") as m:
        assert m.data.shape == (40, 40, 40)


def test_bad_inputs_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.mrc"
    assert cli.run(["simulate", "--map", str(missing), "--o", str(tmp_path / "o"), "--box", "32",
                    "--apix", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.mrc" in err[0] and "not found" in err[0]

    unset = tmp_path / "unset.mrc"
    write_mrc(unset, blob_volume(32), None)
    assert cli.run(["simulate", "--map", str(unset), "--o", str(tmp_path / "o"), "--box", "32",
                    "--apix", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unset.mrc" in err[0] and "voxel size" in err[0]
    # --map-apix rescues it
    assert cli.run(["simulate", "--map", str(unset), "--map-apix", "2", "--o", str(tmp_path / "o"), "--n", "2",
                    "--box", "32", "--apix", "2", "--quiet"]) == 0

    bad_model = tmp_path / "bad.pdb"
    bad_model.write_text("this is not a model\n")
    assert cli.run(["simulate", "--model", str(bad_model), "--o", str(tmp_path / "o2"), "--box", "32",
                    "--apix", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pdb" in err[0]
    assert not (tmp_path / "o2" / "particles.star").exists()

    assert cli.run(["simulate", "--map", str(unset), "--map-apix", "2", "--o", str(tmp_path / "o3"),
                    "--box", "32", "--apix", "2", "--snr", "-1", "--quiet"]) == 2
    assert "--snr" in capsys.readouterr().err


@pytest.mark.relion
def test_relion_reconstructs_the_simulated_particles(tmp_path, relion):
    """RELION 3.1 itself reads our STAR/stack (CTF, astigmatism, origins) and recovers the truth."""
    import os
    import subprocess

    from cryospin_relion.geometry.fsc import fsc

    src = tmp_path / "truth.mrc"
    write_mrc(src, structure_to_map(make_structure(250, seed=3), 40, 2.0), 2.0)
    out = tmp_path / "sim"
    assert cli.run(["simulate", "--map", str(src), "--o", str(out), "--n", "1200", "--box", "40", "--apix", "2",
                    "--snr", "inf", "--shift-std", "2", "--quiet"]) == 0
    exe = os.path.join(relion, "relion_reconstruct")
    r = subprocess.run([exe, "--i", "particles.star", "--o", "rec.mrc", "--ctf"], cwd=out,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with mrcfile.open(out / "rec.mrc") as m:
        rec = np.array(m.data)
    with mrcfile.open(out / "ground_truth.mrc") as m:
        truth = np.array(m.data)
    curve = fsc(torch.as_tensor(rec), torch.as_tensor(truth)).numpy()
    assert curve[1:18].min() > 0.95, np.round(curve, 3)
