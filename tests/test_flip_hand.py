"""Hand flip: the flipped map at the flipped poses projects to the same images (with shifts and CTF)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from cryospin_relion import cli
from cryospin_relion.geometry.ctf import CTF, ctf_2d
from cryospin_relion.geometry.hand import MIRROR, flip_poses_hand, flip_volume_hand
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.rotations import euler_to_matrix_np, matrix_to_euler_np, random_rotations
from cryospin_relion.geometry.shifts import origin_to_translation
from cryospin_relion.geometry.slicing import volume_to_projector
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.read import read_particles

from test_simulate import blob_volume


def _project(vol, rot, trans=None, ctf=None):
    spec = volume_to_projector(torch.as_tensor(vol, dtype=torch.float32), pad=2)
    return project_spectrum(spec, torch.as_tensor(rot, dtype=torch.float32), vol.shape[-1],
                            translations_px=trans, ctf=ctf).numpy()


@pytest.mark.parametrize("n", [32, 33])
def test_flip_volume_keeps_centre_and_is_involution(n):
    v = np.random.default_rng(0).normal(size=(n, n, n)).astype(np.float32)
    f = flip_volume_hand(v)
    c = n // 2
    np.testing.assert_array_equal(f[c], v[c])  # the centre plane stays
    np.testing.assert_array_equal(f[c + 1], v[c - 1])
    np.testing.assert_array_equal(flip_volume_hand(f), v)
    ft = flip_volume_hand(torch.as_tensor(v))
    np.testing.assert_array_equal(ft.numpy(), f)


def test_flip_poses_euler_relation():
    ang = np.array([[30.0, 50.0, -70.0], [-120.0, 100.0, 10.0]])
    A = euler_to_matrix_np(ang)
    B = flip_poses_hand(A)
    np.testing.assert_allclose(B, MIRROR @ A @ MIRROR)
    np.testing.assert_allclose(B, euler_to_matrix_np(ang + [180.0, 0.0, 180.0]), atol=1e-12)
    assert np.allclose(np.linalg.det(B), 1.0)
    np.testing.assert_allclose(matrix_to_euler_np(flip_poses_hand(B)), ang, atol=1e-9)


@pytest.mark.parametrize("n", [32, 33])
def test_flipped_map_at_flipped_poses_gives_same_images(n):
    vol = blob_volume(n, seed=2)
    g = torch.Generator().manual_seed(1)
    A = random_rotations(12, g).numpy()
    trans = torch.randn(12, 2, generator=g) * 3
    params = CTF(defocus_u=torch.full((12,), 15000.0), defocus_v=torch.full((12,), 14000.0),
                 defocus_angle=torch.linspace(0, 170, 12), voltage=torch.full((12,), 300.0),
                 cs=torch.full((12,), 2.7), amp_contrast=torch.full((12,), 0.1))
    ctf = ctf_2d(n, torch.full((12,), 2.0), params)
    orig = _project(vol, A, trans, ctf)
    flipped = _project(flip_volume_hand(vol), flip_poses_hand(A), trans, ctf)
    np.testing.assert_allclose(flipped, orig, atol=1e-4 * np.abs(orig).max())
    # and the unflipped poses do NOT reproduce them (the hand matters for this map)
    wrong = _project(flip_volume_hand(vol), A, trans, ctf)
    assert np.abs(wrong - orig).max() > 0.1 * np.abs(orig).max()


def test_flip_hand_command_with_poses(tmp_path):
    src = tmp_path / "blob.mrc"
    write_mrc(src, blob_volume(32, seed=4), 2.0)
    sim = tmp_path / "sim"
    assert cli.run(["simulate", "--map", str(src), "--o", str(sim), "--n", "10", "--box", "32", "--apix", "2",
                    "--snr", "inf", "--shift-std", "2", "--quiet"]) == 0
    out_map, out_star = tmp_path / "flipped.mrc", tmp_path / "flipped.star"
    assert cli.run(["flip-hand", "--i", str(sim / "ground_truth.mrc"), "--o", str(out_map),
                    "--poses", str(sim / "particles.star"), "--o-poses", str(out_star)]) == 0
    with mrcfile.open(out_map) as m:
        fvol = np.array(m.data)
        assert m.voxel_size.x == pytest.approx(2.0)
    table = read_particles(out_star, datadir=sim)
    with mrcfile.open(sim / "particles.mrcs") as m:
        imgs = np.array(m.data)
    apix = torch.as_tensor(table.apix, dtype=torch.float32)
    ctf = ctf_2d(32, apix, CTF.from_arrays(table.ctf))
    trans = origin_to_translation(torch.as_tensor(table.shifts_A, dtype=torch.float32), apix)
    proj = _project(fvol, table.rotations, trans, ctf)
    np.testing.assert_allclose(proj, imgs, atol=2e-4 * np.abs(imgs).max())
    # flipping twice gives the original poses back
    back = tmp_path / "back.star"
    assert cli.run(["flip-hand", "--i", str(out_map), "--o", str(tmp_path / "back.mrc"),
                    "--poses", str(out_star), "--o-poses", str(back)]) == 0
    t0 = read_particles(sim / "particles.star")
    np.testing.assert_allclose(read_particles(back, datadir=sim).rotations, t0.rotations, atol=1e-6)


def test_flip_hand_bad_inputs(tmp_path, capsys):
    assert cli.run(["flip-hand", "--i", str(tmp_path / "missing.mrc"), "--o", str(tmp_path / "x.mrc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.mrc" in err[0]
    src = tmp_path / "v.mrc"
    write_mrc(src, blob_volume(16), 1.0)
    assert cli.run(["flip-hand", "--i", str(src), "--o", str(tmp_path / "x.mrc"), "--poses", "p.star"]) == 2
    assert "--o-poses" in capsys.readouterr().err
